"""An output folder holds one run: no mixing with an earlier run, no second run at once.

Refusals come before any study is read or model built, so most tests here
train nothing; the ones that do train a few steps of a tiny demo.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from umbrella_core.commands import main
from umbrella_core.config import load_config
from umbrella_core.errors import ConfigError
from umbrella_core.train.run_folder import (
    LOCK_FILE,
    RunLock,
    check_run_folder,
    remove_outputs,
    run_outputs,
)

TINY = ["--modalities", "t1", "--demo-subjects", "6", "--batch-size", "2", "--no-progress"]
CADENCE = ["--set", "trainer.save_steps=2", "--set", "trainer.eval_strategy=no"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One demo (its phantoms written once) for every test of the module."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def umbrella_cache(cache, monkeypatch):
    monkeypatch.setenv("UMBRELLA_CACHE", str(cache))
    return cache


def _train(out: Path, *extra: str) -> int:
    return main(["train", *TINY, *CADENCE, "--output-dir", str(out), *extra])


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


def _finished_run(out: Path, steps: int = 40, **settings: str) -> None:
    """The outputs of a finished run, as it writes them (checkpoints hold its configuration)."""
    # The demo of TINY, as the run that wrote them had it.
    settings = {"data.modalities": "t1", "data.demo_subjects": "6"} | settings
    config = load_config(None, [f"{k}={v}" for k, v in settings.items()])
    for step in range(5, steps + 1, 5):
        checkpoint = out / f"checkpoint-{step}"
        checkpoint.mkdir(parents=True)
        (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        (checkpoint / "umbrella.json").write_text(json.dumps({"config": config.to_dict()}))
    (out / "final").mkdir()
    (out / "metrics.json").write_text(json.dumps({"steps": steps}))


# -- 1. a reused output folder ----------------------------------------------------


def test_a_fresh_run_in_a_folder_of_another_run_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    _finished_run(out)
    before = sorted(p.name for p in out.iterdir())
    assert _train(out, "--max-steps", "2", "--seed", "1") == 2
    error = _error(capsys)
    assert f"{out} holds the outputs of another run" in error
    for advice in ("--resume to continue it", "--overwrite to replace it", "--output-dir"):
        assert advice in error
    assert sorted(p.name for p in out.iterdir()) == before  # nothing written, nothing removed


def test_a_run_that_died_before_saving_anything_does_not_block_its_retry(tmp_path, capsys):
    out = tmp_path / "run"
    # What a run that died at step 4 leaves: its split, its logs, its refused samples.
    (out / "tensorboard").mkdir(parents=True)
    (out / "tensorboard" / "events.out.tfevents.1").write_bytes(b"")
    (out / "split.tsv").write_text("study\tsubject\tsplit\tmade\n")
    (out / "bad_samples.json").write_text("[]")
    (out / ".partial-checkpoint-4").mkdir()
    (out / "notes.txt").write_text("mine")
    assert _train(out, "--max-steps", "2", *CADENCE) == 0
    said = capsys.readouterr().out
    assert "removed the outputs of an earlier run" in said and ".partial-checkpoint-4" in said
    assert (out / "final").is_dir() and (out / "notes.txt").read_text() == "mine"
    assert not (out / ".partial-checkpoint-4").exists()


def test_resume_with_no_checkpoint_in_a_folder_of_a_finished_run_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "final").mkdir(parents=True)
    (out / "metrics.json").write_text("{}")
    assert _train(out, "--max-steps", "2", "--resume") == 2
    assert "a finished run with no checkpoint-N to resume from" in _error(capsys)


def test_overwrite_removes_every_output_of_a_run_and_nothing_else(tmp_path):
    out = tmp_path / "run"
    _finished_run(out, steps=10)
    for name in ("best", "tensorboard", ".partial-checkpoint-15"):
        (out / name).mkdir()
    for name in ("split.tsv", "bad_samples.json", "nan_step.json", "notes.txt"):
        (out / name).write_text("x")
    (out / LOCK_FILE).write_text("{}")
    removed = remove_outputs(out)
    assert {p.name for p in removed} >= {"checkpoint-5", "final", "best", "split.tsv"}
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", LOCK_FILE]
    assert run_outputs(out) == []


@pytest.mark.slow
def test_a_reused_folder_mixes_nothing_and_overwrite_replaces_the_earlier_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(out, "--max-steps", "6") == 0
    first = (out / "checkpoint-6" / "model.safetensors").read_bytes()
    # A shorter run with another seed: refused, the first run intact.
    assert _train(out, "--max-steps", "4", "--seed", "1") == 2
    assert "holds the outputs of another run" in _error(capsys)
    assert (out / "checkpoint-6" / "model.safetensors").read_bytes() == first
    # --resume would continue the first run, not this one: refused too, naming the change.
    assert _train(out, "--max-steps", "4", "--seed", "1", "--resume") == 2
    assert "trainer.seed: 0 → 1" in _error(capsys)
    # --overwrite: the first run's outputs go, the new run's alone remain.
    assert _train(out, "--max-steps", "4", "--seed", "1", "--overwrite") == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "checkpoint-2",
        "checkpoint-4",
        "final",
        "metrics.json",
        "split.tsv",
        "tensorboard",
    ]
    assert json.loads((out / "metrics.json").read_text())["steps"] == 4
    assert len(list((out / "tensorboard").iterdir())) == 1
    # ...and resuming it later, with a longer run, is accepted.
    assert _train(out, "--max-steps", "6", "--seed", "1", "--resume") == 0
    assert json.loads((out / "metrics.json").read_text())["steps"] == 6


def test_overwrite_and_resume_together_are_refused(tmp_path, capsys):
    assert _train(tmp_path / "run", "--resume", "--overwrite") == 2
    assert "give one" in _error(capsys)


# -- 2. one run at a time -----------------------------------------------------------


def _lock(out: Path, pid: int, host: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_FILE
    path.write_text(json.dumps({"pid": pid, "host": host, "started": "2026-01-01T00:00:00"}))
    return path


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_folder_locked_by_a_live_run_is_refused_naming_it(tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        path = _lock(out, holder.pid, socket.gethostname())
        assert _train(out, "--max-steps", "2") == 2
        error = _error(capsys)
        assert f"in use by another umbrella train (pid {holder.pid} on" in error
        assert json.loads(path.read_text())["pid"] == holder.pid  # not taken
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_of_another_host_is_refused_saying_how_to_remove_it(tmp_path):
    out = tmp_path / "run"
    path = _lock(out, 4242, "elsewhere.example")
    with pytest.raises(ConfigError) as caught:
        RunLock.acquire(out)
    message = str(caught.value)
    assert "pid 4242 on host elsewhere.example" in message and f"rm {path}" in message


def test_a_stale_lock_of_a_dead_process_is_taken_over_and_released(tmp_path):
    out = tmp_path / "run"
    path = _lock(out, _dead_pid(), socket.gethostname())
    lock = RunLock.acquire(out)
    held = json.loads(path.read_text())
    assert held["pid"] == os.getpid() and held["host"] == socket.gethostname() and held["started"]
    lock.release()
    assert not path.exists() and sorted(out.iterdir()) == []


def test_the_lock_is_created_exclusively_and_released_after_a_failed_run(tmp_path, capsys):
    out = tmp_path / "run"
    lock = RunLock.acquire(out)
    with pytest.raises(ConfigError, match=f"pid {os.getpid()}"):
        RunLock.acquire(out)
    lock.release()
    # A run refused after taking the lock gives it back.
    (out / "final").mkdir()
    assert _train(out, "--max-steps", "2") == 2
    assert not (out / LOCK_FILE).exists()


SLOW_RUNNER = """
import sys, time
from umbrella_core.train.trainer import UmbrellaTrainer
step = UmbrellaTrainer.training_step
def slow_step(self, *args, **kwargs):
    time.sleep(0.5)
    return step(self, *args, **kwargs)
UmbrellaTrainer.training_step = slow_step
from umbrella_core.commands import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_two_runs_at_once_on_one_folder_the_second_is_refused(tmp_path, umbrella_cache):
    out = tmp_path / "run"
    args = ["train", *TINY, *CADENCE, "--output-dir", str(out), "--max-steps", "30"]
    env = os.environ | {"UMBRELLA_CACHE": str(umbrella_cache), "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(
        [sys.executable, "-c", SLOW_RUNNER, *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoint-2").is_dir():
            assert first.poll() is None and time.monotonic() < deadline, first.stdout.read()
            time.sleep(0.1)
        second = subprocess.run(
            [sys.executable, "-m", "umbrella_core.commands", *args, "--overwrite"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert second.returncode == 2, second.stdout + second.stderr
        assert f"in use by another umbrella train (pid {first.pid} on" in second.stderr
        assert first.poll() is None  # the first run goes on...
        assert first.wait(timeout=300) == 0
    finally:
        if first.poll() is None:
            first.kill()
    # ...to the end, its outputs whole.
    assert json.loads((out / "metrics.json").read_text())["steps"] == 30
    assert (out / "checkpoint-2").is_dir() and not (out / LOCK_FILE).exists()


# -- 3. resuming with another configuration -----------------------------------------


def test_resume_with_changed_settings_is_refused_listing_each_change(tmp_path, capsys):
    out = tmp_path / "run"
    _finished_run(out, steps=10, **{"trainer.learning_rate": "0.01", "model.max_length": "256"})
    (out / "final").rmdir()
    (out / "metrics.json").unlink()
    changed = ["--lr", "0.02", "--batch-size", "4", "--seed", "3", "--set", "model.max_length=128"]
    assert main(["train", *TINY, "--output-dir", str(out), "--resume", *changed]) == 2
    error = _error(capsys)
    assert f"--resume: {out / 'checkpoint-10'} was trained with other settings" in error
    for change in (
        "trainer.learning_rate: 0.01 → 0.02",
        "trainer.batch_size: 16 → 4",
        "trainer.seed: 0 → 3",
        "model.max_length: 256 → 128",
    ):
        assert change in error
    assert "max_steps" not in error and "output_dir" not in error  # always fine to change
    assert "trainer.resume_allow=" in error


def test_resume_allow_accepts_the_changes_it_names(tmp_path):
    out = tmp_path / "run"
    _finished_run(out, steps=10, **{"trainer.learning_rate": "0.01", "trainer.seed": "1"})
    checkpoint = str(out / "checkpoint-10")

    def config(*overrides: str):
        settings = [f"trainer.output_dir={out}", "trainer.resume=auto", *overrides]
        return load_config(None, ["data.modalities=t1", "data.demo_subjects=6", *settings])

    with pytest.raises(ConfigError, match="trainer.seed: 1 → 0"):
        check_run_folder(config("trainer.resume_allow=trainer.learning_rate"), out, checkpoint)
    allowed = config("trainer.resume_allow=learning_rate,trainer.seed", "trainer.max_steps=99")
    check_run_folder(allowed, out, checkpoint)  # bare names that name one setting too
    with pytest.raises(ConfigError, match="seed could be data.split.seed or trainer.seed"):
        check_run_folder(config("trainer.resume_allow=seed"), out, checkpoint)
    with pytest.raises(ConfigError, match="no such setting"):
        check_run_folder(config("trainer.resume_allow=trainer.lr"), out, checkpoint)


def test_a_learning_rate_left_to_choose_is_the_one_the_run_chose_before(tmp_path):
    """A checkpoint recorded with tiny's 1e-3 resumes with the rate left to choose (null)."""
    out = tmp_path / "run"
    _finished_run(out, steps=10, **{"trainer.learning_rate": "0.001"})
    checkpoint = str(out / "checkpoint-10")
    settings = ["data.modalities=t1", "data.demo_subjects=6"]
    settings += [f"trainer.output_dir={out}", "trainer.resume=auto"]
    check_run_folder(load_config(None, settings), out, checkpoint)
    with pytest.raises(ConfigError, match="trainer.learning_rate: 0.001 → 0.002"):
        check_run_folder(
            load_config(None, [*settings, "trainer.learning_rate=2e-3"]), out, checkpoint
        )


def test_resume_may_change_what_evaluation_reports(tmp_path):
    """Baselines and metric settings read the weights, never shape them: no resume_allow needed."""
    out = tmp_path / "run"
    _finished_run(out, steps=10, **{"evaluation.baselines": "off", "trainer.seed": "1"})
    checkpoint = str(out / "checkpoint-10")
    settings = ["data.modalities=t1", "data.demo_subjects=6", "trainer.seed=1"]
    settings += [f"trainer.output_dir={out}", "trainer.resume=auto", "evaluation.baselines=on"]
    check_run_folder(load_config(None, settings), out, checkpoint)
    with pytest.raises(ConfigError, match="trainer.seed: 1 → 2"):
        check_run_folder(load_config(None, [*settings, "trainer.seed=2"]), out, checkpoint)


@pytest.mark.parametrize(
    ("key", "changed", "shown"),
    [
        ("data.modalities", ["--modalities", "t1,dmri"], "data.modalities: t1 → t1,dmri"),
        ("model.trainable", ["--trainable", "full"], "model.trainable: auto → full"),
        (
            "data.geometry",
            ["--set", 'data.geometry={"t1": {"shape": [8, 8, 8]}}'],
            "data.geometry: {} → ",
        ),
    ],
)
def test_resume_refuses_a_changed_model_even_when_allowed(tmp_path, capsys, key, changed, shown):
    out = tmp_path / "run"
    _finished_run(out, steps=5)
    (out / "final").rmdir()
    (out / "metrics.json").unlink()
    args = ["train", *TINY, *changed, "--output-dir", str(out), "--resume"]
    assert main([*args, "--set", f"trainer.resume_allow={key}"]) == 2
    error = _error(capsys)
    assert shown in error and f"{key} cannot change on resuming" in error


# -- 13. a folder that cannot be written, a disk that fills -------------------------


def test_an_unwritable_output_folder_is_refused_before_any_study_is_read(
    tmp_path, capsys, monkeypatch
):
    out = tmp_path / "ro"
    out.mkdir()
    real_open = os.open

    def read_only(path, *args, **kwargs):  # as on a read-only mount (root ignores chmod)
        if os.fspath(path).startswith(str(out) + os.sep):
            raise OSError(30, "Read-only file system", os.fspath(path))
        return real_open(path, *args, **kwargs)

    def read_studies(*args, **kwargs):
        raise AssertionError("studies were read before the output folder was checked")

    monkeypatch.setattr(os, "open", read_only)
    monkeypatch.setattr("umbrella_core.train.run.read_studies", read_studies)
    assert _train(out) == 2
    assert _error(capsys) == (
        f"umbrella: error: {out}: the output folder cannot be written (Read-only file "
        "system); give a writable --output-dir"
    )


def test_a_write_that_fails_for_want_of_room_is_one_line_and_leaves_no_partial(
    tmp_path, umbrella_cache
):
    # A real failed write: the process may write no file over 1 MiB (a
    # checkpoint's weights are ~5 MiB), as a full disk refuses a write.
    out = tmp_path / "run"
    limit = (
        "import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20)); "
        "from umbrella_core.commands import main; sys.exit(main(sys.argv[1:]))"
    )
    args = ["train", *TINY, *CADENCE, "--max-steps", "2", "--output-dir", str(out)]
    ran = subprocess.run(
        [sys.executable, "-c", limit, *args],
        env=os.environ | {"UMBRELLA_CACHE": str(umbrella_cache), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ran.returncode == 2, ran.stderr[-3000:]
    assert ran.stderr.strip() == (
        f"umbrella: error: {out}: a write failed (File too large); no checkpoint was "
        "completed; raise the file-size limit (ulimit -f), then train again"
    )
    assert not any(p.name.startswith(".") for p in out.iterdir())  # no partial checkpoint
    assert not (out / LOCK_FILE).exists()


def test_a_learning_rate_allowed_to_change_takes_effect_from_the_resumed_step(tmp_path):
    out = tmp_path / "run"
    every = ["--max-steps", "4", "--set", "trainer.logging_steps=1"]
    assert _train(out, *every, "--lr", "0.01") == 0
    first = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
    for done in ("checkpoint-4", "final", "best"):
        shutil.rmtree(out / done, ignore_errors=True)
    (out / "metrics.json").unlink()
    allow = ["--set", "trainer.resume_allow=learning_rate"]
    assert _train(out, *every, "--lr", "0.02", "--resume", *allow) == 0
    second = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]

    def rates(history, steps):
        return [e["learning_rate"] for e in history if "loss" in e and e["step"] in steps]

    assert rates(second, (1, 2)) == rates(first, (1, 2))  # restored as they were
    assert rates(second, (3, 4)) == pytest.approx([2 * r for r in rates(first, (3, 4))])
    assert all(r > 0 for r in rates(first, (3,)))


@pytest.mark.parametrize(
    ("make", "remove"),
    [
        (lambda path: path.write_bytes(b"\xff\xfe{pid"), "rm "),
        (lambda path: path.mkdir(), "rm -r "),
    ],
)
def test_a_lock_that_is_not_text_or_a_folder_is_refused_saying_how_to_remove_it(
    tmp_path, make, remove
):
    out = tmp_path / "run"
    out.mkdir()
    make(out / LOCK_FILE)
    with pytest.raises(ConfigError) as caught:
        RunLock.acquire(out)
    message = str(caught.value)
    assert "locked by a lock file that cannot be read" in message
    assert f"{remove}{out / LOCK_FILE}" in message


@pytest.mark.slow
def test_resuming_from_truncated_weights_is_one_line_naming_the_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(out, "--max-steps", "4", *CADENCE) == 0
    weights = out / "checkpoint-4" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert _train(out, "--max-steps", "6", *CADENCE, "--resume") == 2
    error = _error(capsys)
    assert f"{out / 'checkpoint-4'}: its weights cannot be read" in error
    assert "resume from an earlier one" in error


def test_torchs_short_write_is_told_as_the_file_size_limit_or_a_full_disk(tmp_path):
    """torch.save (optimizer.pt) drops the OS error: 'unexpected pos 576 vs 534'. Told by
    the limit in force: EFBIG under ulimit -f, ENOSPC otherwise; other errors stay None."""
    import errno

    from umbrella_core.train.run_folder import write_failure

    code = (
        "import resource, signal, sys, torch\n"
        "from umbrella_core.train.run_folder import write_failure\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))\n"
        "try:\n"
        f"    torch.save({{'a': torch.zeros(10**6)}}, {str(tmp_path / 'o.pt')!r})\n"
        "except Exception as exc:\n"
        "    print(write_failure(exc))\n"
    )
    ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert ran.stdout.strip() == str(errno.EFBIG), ran.stderr[-2000:]
    import resource

    if resource.getrlimit(resource.RLIMIT_FSIZE)[0] == resource.RLIM_INFINITY:
        short = RuntimeError(
            "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"
        )
        assert write_failure(short) == errno.ENOSPC
    assert write_failure(RuntimeError("shape mismatch")) is None
