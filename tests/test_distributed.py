"""Two CPU processes (gloo) where rank 0 holds only t1 samples and rank 1 only dmri ones.

The failure modes of comparable projects: DDP raising "Expected to have
finished reduction" (unused parameters), ZeRO-2 reducing buckets that differ
between ranks, ZeRO-3 "Detected a disagreement on list contents" or hanging.
Coverage (I4) runs every embedder, the vision body and the projector in one
order on every rank, so none of these happen; these tests run the real
Trainer with the project's training arguments under torchrun to show it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WORKER = Path(__file__).with_name("distributed_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return {**os.environ, "UMBRELLA_CACHE": str(cache), "OMP_NUM_THREADS": "1"}


def _run(out: Path, env: dict, *extra: str, ranks: int = 2) -> subprocess.CompletedProcess:
    if ranks == 1:
        command = [sys.executable, str(WORKER), str(out), *extra]
    else:
        torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
        command = [
            torchrun,
            f"--nproc_per_node={ranks}",
            f"--master_port={_free_port()}",
            str(WORKER),
            str(out),
            *extra,
        ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        log = result.stdout + result.stderr
        causes = [line for line in log.splitlines() if "Error" in line or "what()" in line]
        pytest.fail(
            f"{' '.join(command)} exited with {result.returncode}:\n"
            + "\n".join(causes[-20:])
            + "\n--- last output ---\n"
            + log[-4000:]
        )
    return result


@pytest.fixture(scope="module")
def single(tmp_path_factory, env) -> Path:
    out = tmp_path_factory.mktemp("single")
    _run(out, env, ranks=1)
    return out


def _max_difference(a: Path, b: Path) -> float:
    first, second = (
        load_file(str(a / "weights.safetensors")),
        load_file(str(b / "weights.safetensors")),
    )
    assert set(first) == set(second)
    return max(float((first[k] - second[k]).abs().max()) for k in first)


def test_ddp_equals_one_process_over_the_same_global_batches(tmp_path, env, single):
    out = tmp_path / "ddp"
    _run(out, env, "--check-sampler")
    # find_unused_parameters=False (asserted in the worker) and no reduction error;
    # the weights after 3 steps match one process holding both halves of each batch.
    assert _max_difference(out, single) < 1e-4
    losses = json.loads((out / "losses.json").read_text())
    reference = json.loads((single / "losses.json").read_text())
    assert losses == pytest.approx(reference, rel=1e-5)
    assert losses[-1] < losses[0]
    # Each modality's loss curve is logged although each lives on one rank only.
    assert json.loads((out / "logged.json").read_text()) == ["loss/dmri", "loss/t1"]
    # The real DataLoader (2 workers per rank) over one epoch: the ranks draw
    # disjoint samples that together are every sample once.
    drawn = [json.loads((out / f"drawn-{r}.json").read_text()) for r in (0, 1)]
    first, second = drawn[0]["drawn"], drawn[1]["drawn"]
    assert len(first) == len(second) == drawn[0]["total"] // 2
    assert not set(first) & set(second)
    assert sorted(first + second) == list(range(drawn[0]["total"]))


def test_ddp_augments_each_draw_as_one_process_does(tmp_path, env, single):
    # Augmentation is drawn from (seed, epoch, position), never from a rank's
    # state: rank r's half of each global batch is augmented as the single
    # process augments the same draws, so the runs train alike.
    alone, ddp = tmp_path / "alone", tmp_path / "ddp"
    _run(alone, env, "--augment", ranks=1)
    _run(ddp, env, "--augment")
    losses = json.loads((ddp / "losses.json").read_text())
    assert losses == pytest.approx(json.loads((alone / "losses.json").read_text()), rel=1e-5)
    assert _max_difference(ddp, alone) < 1e-4
    # ... and the augmentation did reach the model: not the unaugmented run's losses.
    plain = json.loads((single / "losses.json").read_text())
    assert all(abs(a - b) > 1e-4 for a, b in zip(losses, plain, strict=True))


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_zero_completes_with_ranks_on_different_modalities(tmp_path, env, single, stage):
    out = tmp_path / stage
    result = _run(out, env, "--deepspeed", stage)
    log = result.stdout + result.stderr
    assert "disagreement" not in log and "Timeout" not in log
    losses = json.loads((out / "losses.json").read_text())
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]
    if stage == "zero2":
        # ZeRO-2 partitions optimizer state and gradients, not the model as it
        # is built: same start, same batches, so the same weights as DDP, up to
        # the order ZeRO-2 reduces gradients in. Adam divides each gradient by
        # its own size, so elements whose gradient is near zero carry that
        # rounding into a visible share of a step: 5e-4 is 5 % of one step at
        # the worker's learning rate (0.01), far below any real disagreement.
        assert _max_difference(out, single) < 5e-4


def _cli_run(out: Path, env: dict, launcher: list[str], *extra: str) -> str:
    command = launcher + ["-m", "umbrella_core.commands", "train", "--modalities", "t1,dmri"]
    # 11 subjects: 8 train, 1 validation, 2 test per modality.
    command += ["--demo-subjects", "11", "--max-steps", "3", "--batch-size", "2"]
    command += ["--output-dir", str(out), "--no-progress", *extra]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-4000:]
    return result.stdout


def _bin(name: str) -> str:
    return shutil.which(name, path=os.path.dirname(sys.executable)) or name


def test_umbrella_train_under_accelerate_launch_on_two_processes(tmp_path, env):
    from umbrella_core.model.build import load_checkpoint
    from umbrella_core.plugins import get_plugin_manager

    launcher = [_bin("accelerate"), "launch", "--multi_gpu", "--num_processes", "2"]
    launcher += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launcher += ["--main_process_port", str(_free_port())]
    stdout = _cli_run(tmp_path, env, launcher)
    # One process speaks; the run was two processes: 4 samples per step, 3 steps.
    assert stdout.count("UMBRELLA training run") == 1
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["steps"] == 3
    # 3 of the 8 steps of an epoch: 8 training subjects x 2 questions x 2 modalities
    # (32 samples) at 2 x 2 samples a step.
    assert "'epoch': '0.375'" in stdout
    load_checkpoint(tmp_path / "final", get_plugin_manager())


def test_umbrella_train_under_torchrun_with_zero3_saves_a_whole_checkpoint(tmp_path, env):
    import torch

    from umbrella_core.model.build import load_checkpoint
    from umbrella_core.plugins import get_plugin_manager

    launcher = [_bin("torchrun"), "--nproc_per_node=2", f"--master_port={_free_port()}"]
    _cli_run(tmp_path, env, launcher, "--deepspeed", "zero3")
    # ZeRO-3 holds a partition per rank; the saved checkpoint has every weight.
    model, _, _ = load_checkpoint(tmp_path / "final", get_plugin_manager())
    assert all(p.numel() > 0 and torch.isfinite(p).all() for p in model.parameters())
    assert (tmp_path / "best" / "model.safetensors").is_file()


def test_sigterm_to_one_rank_stops_both_at_one_step_with_a_whole_checkpoint(tmp_path, env):
    import signal
    import time

    import psutil

    # umbrella train with every step slowed down, so the signal lands mid-run.
    runner = tmp_path / "runner.py"
    runner.write_text(
        "import sys, time\n"
        "from umbrella_core.train.trainer import UmbrellaTrainer\n"
        "step = UmbrellaTrainer.training_step\n"
        "def slow(self, *a, **k):\n"
        "    time.sleep(0.3)\n"
        "    return step(self, *a, **k)\n"
        "UmbrellaTrainer.training_step = slow\n"
        "from umbrella_core.commands import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    out = tmp_path / "run"
    args = ["train", "--modalities", "t1,dmri", "--demo-subjects", "10", "--max-steps", "40"]
    args += ["--batch-size", "2", "--output-dir", str(out), "--no-progress"]
    args += ["--set", "trainer.eval_strategy=no", "--set", "trainer.save_steps=100"]
    launcher = [_bin("torchrun"), "--nproc_per_node=2", f"--master_port={_free_port()}"]
    log = tmp_path / "log.txt"
    with open(log, "w") as sink:
        process = subprocess.Popen(
            [*launcher, str(runner), *args],
            env={**env, "PYTHONUNBUFFERED": "1"},
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 300
            while "'loss'" not in log.read_text():  # the first log line, at step 10
                assert process.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline
                time.sleep(0.2)
            time.sleep(1.0)  # a few steps in
            ranks = psutil.Process(process.pid).children()
            assert len(ranks) == 2
            ranks[-1].send_signal(signal.SIGTERM)  # one rank only, as a dying node would
            process.wait(timeout=300)
        finally:
            if process.poll() is None:
                process.kill()
    checkpoints = sorted(out.glob("checkpoint-*"))
    assert len(checkpoints) == 1, log.read_text()[-3000:]
    saved = checkpoints[0]
    step = int(saved.name.split("-")[1])
    assert 0 < step < 40 and not (out / "final").exists()
    # Whole: both ranks' RNG states and the trainer state, from the same step.
    assert (saved / "trainer_state.json").is_file()
    assert {p.name for p in saved.glob("rng_state*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}
    assert json.loads((saved / "trainer_state.json").read_text())["global_step"] == step
    # And the run goes on from there to the end.
    resumed = subprocess.run(
        [
            *launcher[:-1],
            f"--master_port={_free_port()}",
            "-m",
            "umbrella_core.commands",
            *args,
            "--resume",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert json.loads((out / "metrics.json").read_text())["steps"] == 40
