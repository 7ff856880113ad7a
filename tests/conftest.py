from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from umbrella_core.testing import ToyModalityPlugin, fresh_plugin_manager, toy_modality


@pytest.fixture
def toy_specs():
    """Two 3D toy modalities of identical shape: only their name tells them apart."""
    return (
        toy_modality("t1", channels=1, aliases=("t1w",)),
        toy_modality("dmri", channels=1, aliases=("dwi",)),
    )


@pytest.fixture
def toy_pm(toy_specs):
    return fresh_plugin_manager(ToyModalityPlugin(*toy_specs))


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """The quick start's job, run once for the session: ``umbrella train --modalities t1,dmri``.

    Returns the run folder and what it printed.
    """
    out = tmp_path_factory.mktemp("demo")
    env = dict(os.environ)
    env.setdefault("UMBRELLA_CACHE", str(out / "cache"))
    env["OMP_NUM_THREADS"] = "2"  # torch's thread count: one the benchmark table covers
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "umbrella_core.commands",
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
    # Nothing but UMBRELLA's own lines: no library warning on every run.
    noise = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if "warning" in line.lower() or "deprecat" in line.lower()
    ]
    assert not noise, "\n".join(noise)
    return out / "run", result.stdout


@pytest.fixture(scope="session")
def demo_study(demo_run):
    """The manifest of the demo study ``demo_run`` trained on (its held-out files among them)."""
    run_dir, _ = demo_run
    cache = Path(os.environ.get("UMBRELLA_CACHE") or run_dir.parent / "cache")
    manifests = sorted(cache.glob("demo-dmri-t1-*/manifest.jsonl"), key=lambda p: p.stat().st_mtime)
    assert manifests, f"no demo study under {cache}"
    return manifests[-1]
