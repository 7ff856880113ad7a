"""`umbrella train --resume`: a run stopped mid-epoch continues as if it had never stopped."""

from __future__ import annotations

import json
import shutil

import pytest

from umbrella_core.commands import main

pytestmark = pytest.mark.slow


#: Each draw's augmentation must come back the same after resuming too.
AUGMENTED = ("--set", "data.augment.t1=light", "--set", "data.augment.dmri=light")


def _train(out, *extra):
    args = [
        "train",
        "--modalities",
        "t1,dmri",
        "--demo-subjects",
        "10",
        "--max-steps",
        "10",
        "--batch-size",
        "2",
        "--output-dir",
        str(out),
        "--no-progress",
        "--set",
        "trainer.save_steps=3",
        "--set",
        "trainer.logging_steps=1",
        "--set",
        "trainer.eval_strategy=no",
        "--set",
        "trainer.learning_rate=0.01",
        *AUGMENTED,
    ]
    assert main(args + list(extra)) == 0


def _history(out):
    state = json.loads((out / "checkpoint-9" / "trainer_state.json").read_text())
    return {e["step"]: e for e in state["log_history"] if "loss" in e}


def test_resume_mid_epoch_draws_the_same_samples_and_logs_the_same_losses(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("UMBRELLA_CACHE", str(tmp_path / "cache"))
    whole = tmp_path / "whole"
    _train(whole)
    assert "augmenting dmri training images: RandAffine, RandFAScale" in capsys.readouterr().out
    # 16 training samples in batches of 2: an epoch is 8 steps, so step 3 is mid-epoch
    # and the resumed run also crosses into the next epoch.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(whole / "checkpoint-3", resumed / "checkpoint-3")
    _train(resumed, "--resume")
    before, after = _history(whole), _history(resumed)
    assert sorted(after) == list(range(1, 10))
    for step in range(4, 10):
        for key in ("loss", "loss/t1", "loss/dmri", "grad_norm", "learning_rate"):
            if key in before[step] or key in after[step]:
                assert after[step][key] == pytest.approx(before[step][key], rel=1e-5), (step, key)
    # The curve moves, so equal numbers are not an accident of a flat loss.
    assert len({round(before[s]["loss"], 4) for s in range(4, 10)}) > 3


def test_resume_from_a_folder_that_is_not_a_checkpoint_is_refused(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path), "--output-dir", str(tmp_path / "o")]) == 2
    assert "not a training checkpoint" in capsys.readouterr().err


class _Evil:
    """Unpickling it would write a file: a checkpoint file holding code, not tensors."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        from pathlib import Path

        return (Path.touch, (Path(self.marker),))


def test_resume_refuses_a_checkpoint_file_that_holds_code(tmp_path, monkeypatch, capsys):
    import torch

    monkeypatch.setenv("UMBRELLA_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    _train(out)
    marker = tmp_path / "ran"
    for checkpoint in out.glob("checkpoint-*"):
        torch.save({"state": _Evil(marker)}, checkpoint / "optimizer.pt")
    capsys.readouterr()
    args = ["train", "--modalities", "t1,dmri", "--demo-subjects", "10", "--max-steps", "12"]
    args += ["--batch-size", "2", "--output-dir", str(out), "--no-progress", "--resume"]
    # The checkpoint's learning rate (any other is refused before loading: run_folder.py).
    args += ["--lr", "0.01", *AUGMENTED]
    assert main(args) == 2
    error = capsys.readouterr().err.strip()
    assert "checkpoint-10: refused to load the checkpoint's training state" in error
    assert "weights_only" not in error and "Traceback" not in error and "\n" not in error
    assert not marker.exists()
