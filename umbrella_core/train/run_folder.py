"""The output folder of a run: one run at a time, its outputs never mixed with another's.

:func:`claim_run_folder` is what ``umbrella train`` does before reading its
studies (every rank checks, the main process alone locks and removes):

* **A lock** (:class:`RunLock`): ``OUTPUT_DIR/umbrella.lock``, created with
  ``O_CREAT | O_EXCL`` and holding the pid, host and start time of the run that
  holds it, for the run's life. A second run on the folder is refused naming
  the holder; a lock left by a dead process on this host is taken over; one of
  another host is refused with how to remove it once that run is known to have
  ended (its pid cannot be checked from here).
* **Another run's outputs** (:func:`run_outputs`): a run started afresh in a
  folder holding them is refused (``--resume`` continues that run,
  ``--overwrite`` removes them first, or another ``--output-dir``).
* **A changed configuration on resuming** (:func:`config_changes`): the
  checkpoint's ``umbrella.json`` holds the configuration it was trained with;
  every setting that differs is refused (``setting: old → new``) unless
  ``trainer.resume_allow`` names it. Lengths, cadences, progress, paths and
  the evaluation's settings (:data:`ALWAYS_ALLOWED`) may always change; the model's make-up
  (:data:`NEVER_ALLOWED`) never, as the checkpoint's weights would not fit.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs

from umbrella_core.config import RunConfig, learning_rate
from umbrella_core.errors import ConfigError, OutputError
from umbrella_core.processes import process_alive

__all__ = [
    "LOCK_FILE",
    "ALWAYS_ALLOWED",
    "NEVER_ALLOWED",
    "RunLock",
    "run_outputs",
    "remove_outputs",
    "config_changes",
    "check_run_folder",
    "claim_run_folder",
    "write_failure",
]

LOCK_FILE = "umbrella.lock"

#: What a run writes into its output folder (train/run.py, train/faults.py,
#: train/callbacks.py, train/recipes.py); ``*`` ends a prefix.
OUTPUTS = (
    "checkpoint-*",
    ".partial-checkpoint-*",  # a checkpoint being written (train/faults.py)
    "..partial-checkpoint-*",
    ".old-checkpoint-*",
    "final",
    "best",
    "metrics.json",
    "tensorboard",
    "split.tsv",
    "bad_samples.json",
    "nan_step.json",
    "stage-*",  # a staged run (train/recipes.py)
    "stages.json",
)

#: Settings that may change when resuming: lengths, cadences, progress, paths,
#: and what evaluation reports (``evaluation``: baselines and the metric
#: families' settings read the weights, they never shape them).
ALWAYS_ALLOWED = frozenset(
    {
        "evaluation",
        "trainer.output_dir",
        "trainer.resume",
        "trainer.overwrite",
        "trainer.resume_allow",
        "trainer.max_steps",
        "trainer.epochs",
        "trainer.logging_steps",
        "trainer.save_steps",
        "trainer.save_total_limit",
        "trainer.eval_strategy",
        "trainer.eval_steps",
        "trainer.eval_max_samples",
        "trainer.eval_max_new_tokens",
        "trainer.generate_samples",
        "trainer.progress",
        "data.workers",
        "data.check",
        "data.cache",
        "data.cache_dir",
        "data.header_index",
    }
)

#: Settings (or sections) the checkpoint's weights and optimizer state depend on.
NEVER_ALLOWED = (
    "model.base",
    "model.language",
    "model.vision",
    "model.vision_hidden_size",
    "model.vision_layers",
    "model.trainable",
    "model.lora",
    "data.modalities",
    "data.geometry",
    "trainer.deepspeed",
)


# -- the lock ----------------------------------------------------------------


@attrs.define
class RunLock:
    """``OUTPUT_DIR/umbrella.lock``, held by this process until :meth:`release`."""

    path: Path
    holder: dict[str, Any]

    @classmethod
    def acquire(cls, out_dir: Path) -> RunLock:
        """Create the lock, taking over one of a dead process of this host; else refuse.

        The run's first write: a folder it cannot write is refused here, before
        a study is read or the model built.
        """
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _unwritable(out_dir, exc) from None
        path = out_dir / LOCK_FILE
        mine = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        for _ in range(3):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                held = _read_lock(path)
                if held is None:  # removed meanwhile
                    continue
                _refuse_or_take_over(path, held, out_dir)
                continue
            except OSError as exc:
                raise _unwritable(out_dir, exc) from None
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(json.dumps(mine) + "\n")
            except OSError as exc:
                with contextlib.suppress(OSError):
                    path.unlink()
                raise _unwritable(out_dir, exc) from None
            return cls(path, mine)
        raise ConfigError(f"{out_dir}: could not lock it ({path}); try again")

    def release(self) -> None:
        """Remove the lock if it is still this process's."""
        if _read_lock(self.path) == self.holder:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


def _unwritable(out_dir: Path, exc: OSError) -> OutputError:
    return OutputError(
        f"{out_dir}: the output folder cannot be written ({exc.strerror or exc}); "
        "give a writable --output-dir"
    )


#: Writes that fail for the file system's sake, not the run's: no room, a
#: quota, a file-size limit, a read-only mount.
NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})


def write_failure(exc: BaseException) -> int | None:
    """The errno of a write the file system refused (:data:`NO_ROOM`) behind ``exc``, or None.

    Looks through the chain of causes, and at messages of libraries that
    report the OS error as text (safetensors: ``... (os error 28)``). torch's
    writer (``torch.save`` of ``optimizer.pt``) says only ``unexpected pos`` or
    ``iostream error``: then the file-size limit when one is set
    (``ulimit -f``), else a full disk or quota.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in NO_ROOM:
            return exc.errno
        found = re.search(r"\(os error (\d+)\)", str(exc))
        if found and int(found.group(1)) in NO_ROOM:
            return int(found.group(1))
        if isinstance(exc, RuntimeError) and _TORCH_WRITE_FAILED.search(str(exc)):
            return errno.EFBIG if _file_size_limited() else errno.ENOSPC
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return None


#: What torch's zip writer says when a write came short (it drops the OS error).
_TORCH_WRITE_FAILED = re.compile(
    r"unexpected pos \d+ vs \d+|PytorchStreamWriter failed writing|basic_ios::clear"
)


def _file_size_limited() -> bool:
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return soft != resource.RLIM_INFINITY


def _read_lock(path: Path) -> dict[str, Any] | None:
    """The lock's holder; None when there is no lock; ``{}`` when it cannot be read."""
    for attempt in range(5):
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError):  # a folder, unreadable, not text
            return {}
        with contextlib.suppress(ValueError):
            held = json.loads(text)
            if isinstance(held, dict) and isinstance(held.get("pid"), int):
                return held
        time.sleep(0.05 * (attempt + 1))  # being written by the process creating it
    return {}


def _refuse_or_take_over(path: Path, held: dict[str, Any], out_dir: Path) -> None:
    """Return once a stale lock of a dead process of this host is out of the way."""
    here = socket.gethostname()
    if not held:
        raise ConfigError(
            f"{out_dir}: locked by a lock file that cannot be read ({path}); if no "
            f"umbrella train is using the folder, remove it: rm {'-r ' if path.is_dir() else ''}"
            f"{path}"
        )
    pid, host, since = held["pid"], held.get("host", "?"), held.get("started", "?")
    if host == here and (process_alive(pid) or pid == os.getpid()):
        raise ConfigError(
            f"{out_dir}: in use by another umbrella train (pid {pid} on {host}, since {since}); "
            "wait for it to end, or give another --output-dir"
        )
    if host != here:
        raise ConfigError(
            f"{out_dir}: in use by umbrella train pid {pid} on host {host} (since {since}); "
            f"if that run is known to have ended, remove the lock: rm {path}"
        )
    # A dead process of this host: move its lock aside (atomic), then check
    # that it was that lock (not one another process took over meanwhile).
    aside = path.with_name(f".{LOCK_FILE}.stale-{os.getpid()}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    if _read_lock(aside) != held:
        with contextlib.suppress(OSError):
            os.link(aside, path)  # put it back, unless a newer one is in place
    with contextlib.suppress(FileNotFoundError):
        aside.unlink()


# -- outputs -----------------------------------------------------------------


def run_outputs(out_dir: Path) -> list[Path]:
    """The outputs of a run in ``out_dir`` (:data:`OUTPUTS`), sorted by name."""
    if not out_dir.is_dir():
        return []
    found = []
    for path in out_dir.iterdir():
        for name in OUTPUTS:
            if path.name == name or (name.endswith("*") and path.name.startswith(name[:-1])):
                found.append(path)
                break
    return sorted(found)


#: Outputs a run writes before it has trained anything worth keeping: a retry of a run
#: that left only these starts afresh.
LEFTOVERS = ("tensorboard", "split.tsv", "bad_samples.json", "nan_step.json")


def _saved(path: Path) -> bool:
    """Whether ``path`` (one of :func:`run_outputs`) holds something a run trained."""
    return path.name not in LEFTOVERS and not path.name.startswith((".partial-", "..partial-"))


def remove_outputs(out_dir: Path, keep: tuple[Path, ...] = ()) -> list[Path]:
    """Remove the outputs of a run in ``out_dir`` but those in ``keep``; returns the removed."""
    removed = []
    kept = {p.resolve() for p in keep}
    for path in run_outputs(out_dir):
        if path.resolve() in kept:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
        removed.append(path)
    return removed


# -- the configuration of a resumed run ----------------------------------------------


def _settings(config: RunConfig) -> dict[str, Any]:
    """Every setting of ``config`` by dotted name, as JSON values (as umbrella.json holds them)."""
    plain = json.loads(json.dumps(config.to_dict(), default=str))
    settings: dict[str, Any] = {}

    def walk(value: Any, node: Any, prefix: str) -> None:
        for field in attrs.fields(type(value)):
            item = getattr(value, field.name)
            if attrs.has(type(item)):
                walk(item, node[field.name], f"{prefix}{field.name}.")
            else:
                settings[f"{prefix}{field.name}"] = node[field.name]

    walk(config, plain, "")
    return settings


def _lookup(tree: Mapping[str, Any], dotted: str) -> tuple[bool, Any]:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _matches(key: str, names: tuple[str, ...] | frozenset[str]) -> bool:
    return any(key == name or key.startswith(f"{name}.") for name in names)


def _allowed_keys(allow: tuple[str, ...], keys: list[str]) -> set[str]:
    """``trainer.resume_allow``'s names as settings (a bare name must name one setting)."""
    allowed = set()
    for name in allow:
        found = [k for k in keys if k == name or k.startswith(f"{name}.")]
        if not found:
            found = [k for k in keys if k.endswith(f".{name}")]
            if len(found) > 1:
                raise ConfigError(
                    f"trainer.resume_allow: {name} could be {' or '.join(found)}; "
                    "give the full name"
                )
        if not found:
            raise ConfigError(
                f"trainer.resume_allow: {name}: no such setting (dotted names, e.g. "
                "trainer.learning_rate)"
            )
        allowed.update(found)
    return allowed


def _show(value: Any) -> str:
    if isinstance(value, list) and all(isinstance(v, (str, int, float)) for v in value):
        return ",".join(map(str, value)) or "[]"
    return value if isinstance(value, str) and value else json.dumps(value)


def config_changes(recorded: Mapping[str, Any], config: RunConfig) -> list[tuple[str, Any, Any]]:
    """``(setting, recorded, now)`` for each setting that differs, but :data:`ALWAYS_ALLOWED`.

    Settings the recorded configuration lacks (written by another version) are
    not compared.
    """
    changes = []
    for key, now in _settings(config).items():
        known, before = _lookup(recorded, key)
        if key == "trainer.learning_rate":
            # Left to choose (null), it is the rate the same model's run chose before.
            chosen = learning_rate(config)[0]
            before, now = chosen if before is None else before, chosen if now is None else now
        if known and before != now and key not in ALWAYS_ALLOWED:
            changes.append((key, before, now))
    return changes


def _check_resumed_config(config: RunConfig, checkpoint: Path) -> None:
    from umbrella_core.model.exported import CHECKPOINT_META

    try:
        recorded = json.loads((checkpoint / CHECKPOINT_META).read_text()).get("config")
    except (OSError, ValueError, AttributeError):
        recorded = None
    allowed = _allowed_keys(config.trainer.resume_allow, list(_settings(config)))
    if not isinstance(recorded, Mapping):
        return  # a checkpoint of an older version, without its configuration
    changes = config_changes(recorded, config)
    never = [key for key, _, _ in changes if _matches(key, NEVER_ALLOWED)]
    refused = [(k, a, b) for k, a, b in changes if k not in allowed or k in never]
    if not refused:
        return
    listed = "; ".join(f"{k}: {_show(a)} → {_show(b)}" for k, a, b in refused)
    if never:
        advice = (
            f"{', '.join(never)} cannot change on resuming (the checkpoint's weights and "
            "optimizer state are of another model): train afresh with --overwrite or "
            "another --output-dir"
        )
    else:
        names = ",".join(k for k, _, _ in refused)
        advice = (
            f"to resume with these, --set trainer.resume_allow={names}; or train afresh "
            "with --overwrite or another --output-dir"
        )
    raise ConfigError(
        f"--resume: {checkpoint} was trained with other settings ({listed}); {advice}"
    )


def check_run_folder(config: RunConfig, out_dir: Path, resume: str | None) -> None:
    """Refuse a start that would mix runs in ``out_dir`` (read-only; every rank calls it).

    ``resume`` is the checkpoint the run continues from (None: it starts afresh).
    """
    t = config.trainer
    if t.overwrite and t.resume:
        raise ConfigError(
            "trainer.overwrite and trainer.resume: --overwrite starts afresh, --resume "
            "continues; give one"
        )
    if resume is not None:
        _check_resumed_config(config, Path(resume))
        if Path(resume).resolve().parent == out_dir.resolve():
            return
    outputs = run_outputs(out_dir)
    if not outputs or t.overwrite:
        return
    if not any(_saved(p) for p in outputs):
        # A run that stopped before it saved anything (its split, its logs, its refused
        # samples are all that is left): the retry starts afresh and the leftovers go.
        return
    if t.resume == "auto" and not any(p.name in ("final", "metrics.json") for p in outputs):
        return  # a run stopped before its first checkpoint: afresh (the leftovers go)
    names = ", ".join(p.name + ("/" if p.is_dir() else "") for p in outputs[:4])
    held = f"{out_dir} holds the outputs of another run ({names}"
    held += f" and {len(outputs) - 4} more)" if len(outputs) > 4 else ")"
    if resume is not None:
        raise ConfigError(f"{held}: give another --output-dir to continue {resume} in")
    if t.resume:
        raise ConfigError(
            f"{held}, a finished run with no checkpoint-N to resume from: --overwrite to "
            "replace it, or another --output-dir"
        )
    raise ConfigError(
        f"{held}: --resume to continue it, --overwrite to replace it, or another --output-dir"
    )


@contextlib.contextmanager
def claim_run_folder(
    config: RunConfig,
    out_dir: Path,
    resume: str | None,
    *,
    main: bool,
    log: Callable[[str], None] = print,
) -> Iterator[Callable[[], None]]:
    """Hold ``out_dir`` for the block: locked (main process) and checked.

    Gives the block a function that removes an earlier run's outputs where
    that was asked (``--overwrite``, or ``--resume`` with no checkpoint yet);
    the block calls it once its studies are screened, so that a start refused
    for its data leaves the earlier run as it was. Only the main process locks
    and removes: in a distributed run the other ranks share its folder; they
    check it too (before the main process writes anything into it), so that
    every rank refuses the same start.
    """
    lock = RunLock.acquire(out_dir) if main else None

    def clear() -> None:
        if not main or resume is not None:
            return
        split_file = config.data.split.file
        keep = (Path(split_file).expanduser(),) if split_file else ()
        removed = remove_outputs(out_dir, keep)
        if removed:
            log(
                f"removed the outputs of an earlier run in {out_dir}: "
                + ", ".join(p.name for p in removed)
            )

    try:
        check_run_folder(config, out_dir, resume)
        yield clear
    finally:
        if lock is not None:
            lock.release()
