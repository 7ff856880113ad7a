"""The quick start's job: ``umbrella train --modalities t1,dmri`` on the built-in demo.

It must finish on CPU, say where its TensorBoard logs and checkpoint are, and
answer the held-out demo questions (which hemisphere holds the lesion?) with at
least 90% accuracy per modality, where chance is 50%.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from umbrella_core.model.build import load_checkpoint
from umbrella_core.plugins import get_plugin_manager

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    env = dict(os.environ)
    env.setdefault("UMBRELLA_CACHE", str(out / "cache"))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "umbrella_core.cli",
            "train",
            "--modalities",
            "t1,dmri",
            "--output-dir",
            str(out / "run"),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return out / "run", result.stdout


def test_demo_learns_from_the_images(demo_run):
    run_dir, stdout = demo_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    held_out = metrics["held_out"]
    assert set(held_out) == {"t1", "dmri"}
    for modality, result in held_out.items():
        assert result["n"] >= 20
        assert result["accuracy"] >= 0.9, (modality, result, stdout)
        # The table the user sees holds the same figure.
        assert re.search(rf"^{modality}\s+{result['n']}\s+{result['accuracy']:.1%}", stdout, re.M)


def test_demo_prints_where_logs_and_checkpoint_are_and_both_exist(demo_run):
    run_dir, stdout = demo_run
    checkpoint = Path(re.search(r"^checkpoint:\s+(\S+)", stdout, re.M).group(1))
    logs = Path(re.search(r"^tensorboard:\s+(\S+)", stdout, re.M).group(1))
    assert list(logs.glob("events.out.tfevents.*"))
    model, tokenizer, meta = load_checkpoint(checkpoint, get_plugin_manager())
    assert [m["name"] for m in meta["modalities"]] == ["dmri", "t1"]
    assert {m["distribution"] for m in meta["modalities"]} == {"umbrella-dmri", "umbrella-t1"}
    assert not list(checkpoint.glob("*.bin")) and not list(checkpoint.glob("*.pt"))


def test_demo_logs_per_modality_loss_to_tensorboard(demo_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = demo_run
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss/t1", "train/loss/dmri", "train/loss"} <= tags
    t1 = [e.value for e in acc.Scalars("train/loss/t1")]
    assert t1[-1] < t1[0] / 2  # it trained


def test_demo_summary_names_modalities_plugins_and_parameters(demo_run):
    _, stdout = demo_run
    assert re.search(r"trainable\s+full: [\d,]+ of [\d,]+ parameters", stdout)
    for name, distribution in (("t1", "umbrella-t1"), ("dmri", "umbrella-dmri")):
        version = importlib.metadata.version(distribution)
        assert re.search(rf"{name}\s+{distribution} {re.escape(version)}\s", stdout)
