"""Faults during training: SIGKILL, a crash mid-checkpoint, SIGTERM/SIGINT, a NaN loss.

Real ``umbrella train`` processes are killed and resumed; the resumed runs must log
the per-step losses of an uninterrupted run (same samples, same optimizer state).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from umbrella_core.commands import main
from umbrella_core.train.arguments import resume_checkpoint
from umbrella_core.train.faults import NAN_REPORT, PARTIAL_PREFIX

MAX_STEPS = 28
SAVE_STEPS = 7

# The process under test: `umbrella train` (commands.main), each step slowed down so
# that the test can act at a step of its choosing, and optionally crashing
# (os._exit: no cleanup, like a kill) while checkpoint-CRASH_AT is half written.
RUNNER = """
import os, sys, time
from umbrella_core.train.trainer import UmbrellaTrainer

delay = float(os.environ.get("FAULTS_STEP_DELAY", "0"))
crash_at = int(os.environ.get("FAULTS_CRASH_AT", "0"))
training_step = UmbrellaTrainer.training_step
save_rng_state = UmbrellaTrainer._save_rng_state

def slow_step(self, *args, **kwargs):
    time.sleep(delay)
    return training_step(self, *args, **kwargs)

def crashing_save(self, output_dir):
    if self.state.global_step == crash_at:
        os._exit(3)  # weights and optimizer written, RNG and trainer state not
    return save_rng_state(self, output_dir)

UmbrellaTrainer.training_step = slow_step
UmbrellaTrainer._save_rng_state = crashing_save
from umbrella_core.commands import main
sys.exit(main(sys.argv[1:]))
"""


def _args(out: Path, steps: int = MAX_STEPS, save_steps: int = SAVE_STEPS) -> list[str]:
    return [
        "train",
        "--modalities",
        "t1,dmri",
        "--demo-subjects",
        "10",
        "--max-steps",
        str(steps),
        "--batch-size",
        "2",
        "--output-dir",
        str(out),
        "--no-progress",
        "--set",
        f"trainer.save_steps={save_steps}",
        "--set",
        "trainer.logging_steps=1",
        "--set",
        "trainer.eval_strategy=no",
        "--set",
        "trainer.learning_rate=0.01",
    ]


def _train_here(out: Path, *extra: str) -> int:
    """``umbrella train`` in this process, on one thread like the subprocesses."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(_args(out) + list(extra))
    finally:
        torch.set_num_threads(threads)


class Run:
    """``umbrella train`` in a subprocess whose output the test watches."""

    def __init__(self, out: Path, cache: Path, *, delay: float, crash_at: int = 0) -> None:
        self.out = out
        self.log = out.parent / f"{out.name}.log"
        env = os.environ | {
            "UMBRELLA_CACHE": str(cache),
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
            "FAULTS_STEP_DELAY": str(delay),
            "FAULTS_CRASH_AT": str(crash_at),
        }
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-c", RUNNER, *_args(out)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )

    def steps_logged(self) -> int:
        """Steps done so far (one ``{'loss': ...}`` line per step with logging_steps=1)."""
        return self.log.read_text().count("{'loss'")

    def wait_until(self, condition, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.process.poll() is None, f"ended early:\n{self.log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, self.log.read_text()[-3000:]
            time.sleep(0.01)

    def wait(self, timeout: float = 60.0) -> int:
        return self.process.wait(timeout)


def _losses(checkpoint: Path) -> dict[int, dict]:
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return {e["step"]: e for e in state["log_history"] if "loss" in e}


def _assert_continues_like(resumed: Path, reference: dict[int, dict], after: int) -> None:
    """The resumed run logs, for every step after ``after``, the uninterrupted run's numbers."""
    got = _losses(resumed / f"checkpoint-{MAX_STEPS}")
    assert sorted(got) == list(range(1, MAX_STEPS + 1))
    for step in range(after + 1, MAX_STEPS + 1):
        for key in ("loss", "loss/t1", "loss/dmri", "grad_norm", "learning_rate"):
            if key in reference[step] or key in got[step]:
                assert got[step][key] == pytest.approx(reference[step][key], rel=1e-5), (step, key)
    assert (resumed / "final" / "model.safetensors").is_file()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("umbrella-cache")


@pytest.fixture(scope="module")
def reference(cache, tmp_path_factory):
    """The per-step logs of an uninterrupted run."""
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("UMBRELLA_CACHE", str(cache))
        assert _train_here(out) == 0
    history = _losses(out / f"checkpoint-{MAX_STEPS}")
    # The curve moves, so equal numbers after a resume are not an accident of a flat loss.
    assert len({round(history[s]["loss"], 4) for s in range(8, MAX_STEPS + 1)}) > 5
    return history


@pytest.fixture
def umbrella_cache(cache, monkeypatch):
    monkeypatch.setenv("UMBRELLA_CACHE", str(cache))
    return cache


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_logs_the_losses_of_an_uninterrupted_run(
    tmp_path, umbrella_cache, reference
):
    out = tmp_path / "run"
    run = Run(out, umbrella_cache, delay=0.15)
    # Past the first checkpoint by a few steps, then killed without warning.
    run.wait_until(
        lambda: (out / f"checkpoint-{SAVE_STEPS}").is_dir() and run.steps_logged() >= SAVE_STEPS + 2
    )
    run.process.send_signal(signal.SIGKILL)
    assert run.wait() == -signal.SIGKILL
    killed_at = run.steps_logged()
    last = resume_checkpoint("auto", out)
    assert last is not None and not (out / "final").exists()
    resumed_from = int(Path(last).name.split("-")[1])
    assert resumed_from < killed_at < MAX_STEPS  # steps after the checkpoint were lost...
    assert _train_here(out, "--resume") == 0
    _assert_continues_like(out, reference, after=resumed_from)  # ...and redone identically


@pytest.mark.slow
def test_a_crash_while_a_checkpoint_is_written_leaves_the_previous_one_to_resume_from(
    tmp_path, umbrella_cache, reference
):
    out = tmp_path / "run"
    run = Run(out, umbrella_cache, delay=0.0, crash_at=2 * SAVE_STEPS)
    assert run.wait() == 3, run.log.read_text()[-3000:]
    # The half-written checkpoint exists only under its partial name.
    partial = out / f"{PARTIAL_PREFIX}checkpoint-{2 * SAVE_STEPS}"
    assert (partial / "model.safetensors").is_file() and (partial / "optimizer.pt").is_file()
    assert not (partial / "trainer_state.json").exists()
    assert not (out / f"checkpoint-{2 * SAVE_STEPS}").exists()
    assert resume_checkpoint("auto", out) == str(out / f"checkpoint-{SAVE_STEPS}")
    # The previous checkpoint loads and training continues from it exactly.
    assert _train_here(out, "--resume") == 0
    _assert_continues_like(out, reference, after=SAVE_STEPS)
    assert not any(p.name.startswith(".") for p in out.iterdir())  # the partial is cleaned up


def test_resume_auto_passes_over_a_checkpoint_folder_without_trainer_state(tmp_path):
    for step, complete in ((3, True), (6, True), (9, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"")
        if complete:
            (folder / "trainer_state.json").write_text("{}")
    (tmp_path / f"{PARTIAL_PREFIX}checkpoint-12").mkdir()
    assert resume_checkpoint("auto", tmp_path) == str(tmp_path / "checkpoint-6")
    assert resume_checkpoint("auto", tmp_path / "missing") is None


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"]
)
def test_sigterm_and_sigint_save_at_the_end_of_the_step_and_resume_continues(
    tmp_path, umbrella_cache, reference, signum, code
):
    out = tmp_path / "run"
    run = Run(out, umbrella_cache, delay=0.2)
    run.wait_until(lambda: run.steps_logged() >= 2)
    run.process.send_signal(signum)
    assert run.wait() == code
    stopped_at = run.steps_logged()
    text = run.log.read_text()
    name = signal.Signals(signum).name
    assert f"training stopped by {name} after step {stopped_at}" in text
    # Saved by the signal (not a periodic checkpoint), complete, and nothing after it.
    assert 2 <= stopped_at < SAVE_STEPS
    assert resume_checkpoint("auto", out) == str(out / f"checkpoint-{stopped_at}")
    assert not (out / "final").exists() and not (out / "metrics.json").exists()
    if signum == signal.SIGTERM:
        assert _train_here(out, "--resume") == 0
        _assert_continues_like(out, reference, after=stopped_at)


def test_atomic_checkpoints_keep_rotation_working(tmp_path, umbrella_cache, monkeypatch):
    from umbrella_core.train import arguments as arguments_module

    arguments = arguments_module.training_arguments

    def at_most_two(config, out_dir):
        args = arguments(config, out_dir)
        args.save_total_limit = 2
        return args

    monkeypatch.setattr(arguments_module, "training_arguments", at_most_two)
    out = tmp_path / "run"
    assert main(_args(out, steps=6, save_steps=2)) == 0
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == [
        "checkpoint-4",
        "checkpoint-6",
    ]
    assert _losses(out / "checkpoint-6")[6]["loss"] > 0


def test_signal_handlers_are_only_ours_while_training(tmp_path, umbrella_cache):
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    seen = []

    from umbrella_core.train import faults

    install = faults.StopOnSignal.install

    def spy(self, *args, **kwargs):
        install(self, *args, **kwargs)
        seen.append(signal.getsignal(signal.SIGTERM))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(faults.StopOnSignal, "install", spy)
        assert main(_args(tmp_path / "run", steps=2)) == 0
    assert seen and isinstance(getattr(seen[0], "__self__", None), faults.StopOnSignal)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_a_nan_loss_stops_the_run_naming_the_step_and_its_samples(tmp_path, umbrella_cache, capsys):
    import torch

    from umbrella_core import LossTerm, hookimpl
    from umbrella_core.config import load_config
    from umbrella_core.errors import UmbrellaError
    from umbrella_core.testing import ToyModalityPlugin, fresh_plugin_manager, toy_modality
    from umbrella_core.train.faults import NonFiniteLossError
    from umbrella_core.train.run import train

    nan_at = 5  # the 5th training forward, i.e. step 5 (no gradient accumulation)
    calls = []

    def compute(outputs, batch):
        calls.append(1)
        value = outputs.nll * 0
        return value + float("nan") if len(calls) == nan_at else value

    class NanAtStep:
        @hookimpl
        def umbrella_loss_terms(self, modalities, settings):
            return [LossTerm(name="unstable", compute=compute)]

    pm = fresh_plugin_manager(
        ToyModalityPlugin(toy_modality("t1", channels=1), toy_modality("dmri", channels=1)),
        NanAtStep(),
    )
    out = tmp_path / "run"
    config = load_config(
        None,
        [
            "data.modalities=t1,dmri",
            "data.demo_subjects=6",
            "trainer.max_steps=10",
            "trainer.batch_size=2",
            "trainer.save_steps=2",
            "trainer.logging_steps=1",
            "trainer.eval_strategy=no",
            "trainer.progress=false",
            f"trainer.output_dir={out}",
        ],
    )
    with pytest.raises(NonFiniteLossError) as caught:
        train(config, pm, log=lambda _: None)
    assert isinstance(caught.value, UmbrellaError)  # the CLI prints one line, exits 2
    message = str(caught.value)
    report = json.loads((out / NAN_REPORT).read_text())
    assert report["step"] == nan_at and f"at step {nan_at}" in message
    assert "unstable=nan" in message
    assert len(report["samples"]) == 2
    for sample in report["samples"]:
        assert sample["modality"] in ("t1", "dmri")
        assert sample["source"] and sample["source"] in message  # file:line of the record
        assert sample["source"].rsplit(":", 1)[-1].isdigit()
    # Checkpoints before the NaN are intact and nothing of step 5 was saved.
    assert report["last_checkpoint"] == str(out / "checkpoint-4")
    assert resume_checkpoint("auto", out) == str(out / "checkpoint-4")
    assert not (out / "checkpoint-6").exists()
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and (out / "checkpoint-2").is_dir()
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in state["log_history"] if "loss" in e)


def test_a_stop_runs_no_evaluation_and_no_second_save_at_the_end_of_the_epoch():
    """After SIGTERM the Trainer still ends the epoch; with eval_strategy: epoch that ran a
    whole validation pass before exiting (365 s), past a scheduler's grace period."""
    import signal
    from types import SimpleNamespace

    from transformers import TrainerControl
    from transformers.trainer_callback import DefaultFlowCallback
    from transformers.trainer_utils import IntervalStrategy

    from umbrella_core.train.faults import StopOnSignal

    args = SimpleNamespace(
        world_size=1,
        eval_strategy=IntervalStrategy.EPOCH,
        save_strategy=IntervalStrategy.EPOCH,
        logging_strategy=IntervalStrategy.NO,
        eval_delay=0,
    )
    state = SimpleNamespace(global_step=85, epoch=1.0)
    stopper, control = StopOnSignal(log=lambda _: None), TrainerControl()
    stopper.handle(signal.SIGTERM)
    control = stopper.on_step_end(args, state, control)
    assert control.should_save and control.should_training_stop and not control.should_evaluate
    control.should_save = False  # the Trainer saved checkpoint-85
    flow = DefaultFlowCallback()
    control = flow.on_epoch_end(args, state, control)
    assert control.should_evaluate and control.should_save  # what the Trainer would do
    control = stopper.on_epoch_end(args, state, control)
    assert not control.should_evaluate and not control.should_save
