"""Faults during training: atomic checkpoints, stopping on a signal, non-finite losses.

* :func:`save_training_checkpoint` writes ``checkpoint-N/`` (weights, optimizer,
  scheduler, RNG and trainer state) into a hidden sibling folder and renames it
  into place once every process has written its part, so a process killed
  mid-write leaves no ``checkpoint-N/`` at all, and the previous one intact.
  :func:`last_complete_checkpoint` is what ``--resume`` (``auto``) picks.
* :class:`StopOnSignal` turns SIGINT and SIGTERM (what SLURM sends before
  preempting a job) into "save a checkpoint at the end of this step and stop";
  every rank stops at the same step. :class:`TrainingInterrupted` then ends the
  run with exit code 128 + the signal number (130, 143).
* :func:`check_loss` stops a run whose loss is NaN or infinite before the
  optimizer applies it, naming the step and its samples (file and line, modality)
  and writing them to ``OUTPUT_DIR/nan_step.json``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from umbrella_core.errors import UmbrellaError

__all__ = [
    "PARTIAL_PREFIX",
    "NAN_REPORT",
    "TrainingInterrupted",
    "NonFiniteLossError",
    "last_complete_checkpoint",
    "save_training_checkpoint",
    "remove_partials",
    "StopOnSignal",
    "stop_on_signals",
    "check_loss",
]

#: A checkpoint being written is ``.partial-checkpoint-N``: hidden, and outside
#: the ``checkpoint-*`` names that transformers resumes from and rotates.
PARTIAL_PREFIX = ".partial-"
NAN_REPORT = "nan_step.json"
TRAINER_STATE = "trainer_state.json"


class TrainingInterrupted(UmbrellaError):
    """Training stopped on SIGINT or SIGTERM after saving a resumable checkpoint.

    ``exit_code`` is 128 + the signal number (130 for SIGINT, 143 for SIGTERM),
    the shell's convention for a process ended by that signal: a job chain
    (``afterok``) must not take an interrupted run for a finished one.
    """

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


class NonFiniteLossError(UmbrellaError):
    """The loss of a training step is NaN or infinite; nothing of that step was applied."""


# -- checkpoints ---------------------------------------------------------------


def last_complete_checkpoint(out_dir: str | os.PathLike) -> str | None:
    """The ``checkpoint-N`` of ``out_dir`` with the highest N that holds its trainer state.

    Folders being written are not named ``checkpoint-N`` (see
    :func:`save_training_checkpoint`); one without ``trainer_state.json`` (from
    an older version, or copied in part) is passed over as well.
    """
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    folder = Path(out_dir)
    if not folder.is_dir():
        return None
    steps = []
    for path in folder.iterdir():
        prefix, _, step = path.name.partition("-")
        if prefix == PREFIX_CHECKPOINT_DIR and step.isdigit() and path.is_dir():
            steps.append((int(step), path))
    for _, path in sorted(steps, reverse=True):
        if (path / TRAINER_STATE).is_file():
            return str(path)
    return None


def _fsync_tree(folder: Path) -> None:
    """Flush a folder's files and entries to disk (the rename must not outrun them)."""
    for path in sorted(folder.rglob("*"), reverse=True):
        flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
        with contextlib.suppress(OSError):
            fd = os.open(path, flags)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_partials(run_dir: Path) -> None:
    """Remove the partial checkpoints a killed process left behind."""
    if not run_dir.is_dir():
        return
    for path in run_dir.iterdir():
        # (save_checkpoint's own aside folder is ``..partial-checkpoint-N.tmp-PID``.)
        if path.name.startswith((PARTIAL_PREFIX, f".{PARTIAL_PREFIX}")) and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


def save_training_checkpoint(trainer: Any, trial: Any = None) -> Path:
    """``Trainer._save_checkpoint`` (transformers 5), with ``checkpoint-N`` appearing atomically.

    Every process writes its part (weights from the main one; optimizer,
    scheduler, RNG state per rank; DeepSpeed's shards) into
    ``.partial-checkpoint-N``; after a barrier the saving process renames it to
    ``checkpoint-N``. Best-model bookkeeping and rotation
    (``save_total_limit``) then run as in transformers.
    """
    from transformers.trainer_callback import ExportableState
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, SaveStrategy, rotate_checkpoints

    args, state = trainer.args, trainer.state
    if trainer.hp_search_backend is None and trial is None:
        trainer.store_flos()
    run_dir = Path(trainer._get_output_dir(trial=trial))
    final = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
    partial = run_dir / f"{PARTIAL_PREFIX}{final.name}"
    wait = trainer.accelerator.wait_for_everyone
    if args.should_save:
        remove_partials(run_dir)
    wait()
    trainer.save_model(str(partial), _internal_call=True)
    # transformers lets other ranks write their RNG state while the main
    # process is still writing the weights; save_checkpoint renames its folder
    # into place, which would drop their files: wait for it.
    wait()
    os.makedirs(partial, exist_ok=True)
    if args.save_strategy in (SaveStrategy.STEPS, SaveStrategy.EPOCH, SaveStrategy.BEST) and (
        state.best_global_step
    ):
        best = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{state.best_global_step}"
        if best == final or best.exists():
            state.best_model_checkpoint = str(best)
    if not args.save_only_model:
        trainer._save_optimizer_and_scheduler(str(partial))
        trainer._save_scaler(str(partial))
        trainer._save_rng_state(str(partial))
    if args.should_save:
        for cb in trainer.callback_handler.callbacks + [trainer.control]:
            if not isinstance(cb, ExportableState):
                continue
            name = cb.__class__.__name__
            if isinstance(state.stateful_callbacks[name], list):
                state.stateful_callbacks[name].append(cb.state())
            else:
                state.stateful_callbacks[name] = cb.state()
        # Written last: its presence marks a complete checkpoint for older readers.
        state.save_to_json(str(partial / TRAINER_STATE))
    wait()
    if args.should_save:
        _fsync_tree(partial)
        if final.exists():
            old = run_dir / f".old-{final.name}-{os.getpid()}"
            final.rename(old)
            partial.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            partial.rename(final)
        _fsync_dir(run_dir)
    wait()
    if args.push_to_hub:
        trainer._push_from_checkpoint(str(final))
    if args.should_save:
        rotate_checkpoints(
            output_dir=str(run_dir),
            save_total_limit=args.save_total_limit,
            best_model_checkpoint=state.best_model_checkpoint,
            use_mtime=True,
        )
    return final


# -- SIGINT / SIGTERM ----------------------------------------------------------


class StopOnSignal(TrainerCallback):
    """Save a checkpoint at the end of the current step and stop, once a signal came.

    The handlers (installed by :func:`stop_on_signals` for the duration of
    ``trainer.train()``) only note the signal; a second one of the same kind
    acts as the handler before ours would (SIGINT: KeyboardInterrupt at once;
    SIGTERM: the process ends). In a distributed run the ranks agree each step
    (an all-reduce of the flag), so every rank saves and stops at the same step
    even when the signal reached them at different steps.
    """

    def __init__(self, log: Callable[[str], None] | None = None) -> None:
        self.received: int | None = None
        self.stopped_at: int | None = None
        self.log = log or (lambda message: print(message, file=sys.stderr, flush=True))
        self._previous: dict[int, Any] = {}

    def handle(self, signum: int, frame: Any = None) -> None:
        if self.received is not None:
            self.restore()
            signal.raise_signal(signum)
            return
        self.received = signum
        self.log(
            f"umbrella: {signal.Signals(signum).name} received: saving a checkpoint at the end "
            "of this step, then stopping (send it again to stop at once)"
        )

    def install(self, signals: Sequence[int] = (signal.SIGINT, signal.SIGTERM)) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread may set handlers; nothing to restore then
        for signum in signals:
            self._previous[signum] = signal.signal(signum, self.handle)

    def restore(self) -> None:
        previous, self._previous = self._previous, {}
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    def _agreed_signal(self, args: Any) -> int:
        signum = self.received or 0
        if args.world_size > 1:
            import torch
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                flag = torch.tensor([signum], dtype=torch.int64, device=args.device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                signum = int(flag.item())
        return signum

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        signum = self._agreed_signal(args)
        if signum and self.stopped_at is None:
            self.received = self.received or signum
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True
        if self.stopped_at is not None:
            # A stop saves and exits: an evaluation due at this step would outlast a
            # scheduler's grace period (the held-out set can take minutes).
            control.should_evaluate = False
        return control

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self.stopped_at is not None:
            # The Trainer ends the epoch after a stop too, and would evaluate (and save the
            # same step again) for eval_strategy/save_strategy "epoch".
            control.should_evaluate = False
            control.should_save = False
        return control


@contextlib.contextmanager
def stop_on_signals(
    trainer: Any, log: Callable[[str], None] | None = None
) -> Iterator[StopOnSignal]:
    """SIGINT/SIGTERM handlers and a :class:`StopOnSignal` callback while the block runs.

    The previous handlers and the trainer's callbacks are restored on leaving.
    """
    stopper = StopOnSignal(log)
    trainer.add_callback(stopper)
    stopper.install()
    try:
        yield stopper
    finally:
        stopper.restore()
        trainer.remove_callback(stopper)


def interrupted_error(stopper: StopOnSignal, out_dir: str | os.PathLike) -> TrainingInterrupted:
    """The error that ends a run stopped by ``stopper`` (its message says how to go on)."""
    assert stopper.received is not None and stopper.stopped_at is not None
    name = signal.Signals(stopper.received).name
    checkpoint = Path(out_dir) / f"checkpoint-{stopper.stopped_at}"
    return TrainingInterrupted(
        f"training stopped by {name} after step {stopper.stopped_at}; checkpoint: {checkpoint} "
        "(umbrella train --resume continues from it)",
        stopper.received,
    )


# -- non-finite losses -------------------------------------------------------------


def _number(value: float) -> float | str:
    return value if math.isfinite(value) else str(value)


def check_loss(
    trainer: Any,
    loss: Any,
    outputs: Any,
    sample_keys: Sequence[str] | None,
    sources: Sequence[str | None] | None,
) -> None:
    """Raise :class:`NonFiniteLossError` when ``loss`` is NaN or infinite on any rank.

    Called on each micro-batch before its backward pass, so the optimizer never
    applies the step. Every rank calls it (in a distributed run the ranks agree
    on the outcome with one all-reduce, and the report holds every rank's
    samples); the main process writes ``OUTPUT_DIR/nan_step.json``.
    """
    args = trainer.args
    bad, distributed = _non_finite_anywhere(args, loss)
    if not bad:
        return
    mine = _rank_losses(args, loss, outputs, sample_keys, sources)
    parts = _all_ranks(mine, distributed)
    step = trainer.state.global_step + 1
    checkpoint = last_complete_checkpoint(args.output_dir)
    report = {
        "step": step,
        "ranks": parts,
        "samples": [s | {"rank": p["rank"]} for p in parts for s in p["samples"]],
        "last_checkpoint": checkpoint,
    }
    path = Path(args.output_dir) / NAN_REPORT
    if args.process_index == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
    raise NonFiniteLossError(_non_finite_message(report, path))


def _non_finite_anywhere(args: Any, loss: Any) -> tuple[bool, bool]:
    """Whether the loss is not finite on any rank, and whether the run is distributed."""
    import torch

    bad = (~torch.isfinite(loss.detach())).any().to(torch.int64).reshape(1)
    distributed = False
    if args.world_size > 1:
        import torch.distributed as dist

        distributed = dist.is_available() and dist.is_initialized()
        if distributed:
            bad = bad.to(args.device)
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bool(int(bad.item())), distributed


def _rank_losses(
    args: Any,
    loss: Any,
    outputs: Any,
    sample_keys: Sequence[str] | None,
    sources: Sequence[str | None] | None,
) -> dict[str, Any]:
    """This rank's part of the report: its loss, NLL, loss terms and samples."""
    terms = {
        name: _number(float(value.detach().float().mean()))
        for name, value in (getattr(outputs, "terms", None) or {}).items()
    }
    nll = getattr(outputs, "nll", None)
    return {
        "rank": args.process_index,
        "loss": _number(float(loss.detach().float().mean())),
        "nll": None if nll is None else _number(float(nll.detach().float())),
        "terms": terms,
        "samples": [
            {"source": source, "modality": key}
            for source, key in zip(
                sources or [None] * len(sample_keys or []), sample_keys or [], strict=False
            )
        ],
    }


def _all_ranks(mine: dict[str, Any], distributed: bool) -> list[Any]:
    """Every rank's part of the report, in rank order (only ours when not distributed)."""
    parts: list[Any] = [mine]
    if distributed:
        import torch.distributed as dist

        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, mine)
    return parts


def _non_finite_message(report: dict[str, Any], path: Path) -> str:
    """The error's message: the step, its samples, the odd loss terms, and how to go on."""
    parts, checkpoint = report["ranks"], report["last_checkpoint"]
    where = ", ".join(f"{s['source'] or '?'} ({s['modality']})" for s in report["samples"])
    odd = [
        f"{name}={value}"
        for p in parts
        for name, value in p["terms"].items()
        if isinstance(value, str)
    ]
    losses = ", ".join(str(p["loss"]) for p in parts if isinstance(p["loss"], str))
    return (
        f"the loss is {losses or 'not finite'} at step {report['step']}, before the optimizer "
        f"applied it; samples of that step: {where or 'unknown'}"
        + (f"; non-finite loss terms: {', '.join(odd)}" if odd else "")
        + f". Report: {path}. "
        + (
            f"The last checkpoint, {checkpoint}, is intact (umbrella train --resume)."
            if checkpoint
            else "No checkpoint was saved before it."
        )
    )
