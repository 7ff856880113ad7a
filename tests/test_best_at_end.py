"""Which records choose the best weights, which ones the end reports, and ``load_best_at_end``.

Small runs of the toy plugins on the built-in demo: 10 subjects per modality
are 7 train, 1 validation and 2 test records.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from umbrella_core.config import load_config
from umbrella_core.data.demo import write_demo

SMALL = [
    "data.modalities=[t1, dmri]",
    "data.demo_subjects=10",
    "trainer.batch_size=4",
    "trainer.logging_steps=1",
    "trainer.eval_strategy=steps",
    "trainer.eval_steps=2",
    "trainer.max_steps=6",
    "trainer.warmup_ratio=0",
    # Large enough steps that the weights move away from the best ones after it.
    "trainer.learning_rate=0.05",
    "trainer.generate_samples=0",
    "trainer.progress=false",
]


@pytest.fixture
def demo_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("UMBRELLA_CACHE", str(tmp_path / "cache"))


def _train(pm, out: Path, *overrides: str) -> tuple[dict, list[str]]:
    from umbrella_core.train.run import train

    lines: list[str] = []
    config = load_config(None, [*SMALL, f"trainer.output_dir={out}", *overrides])
    return train(config, pm, log=lines.append), lines


def _weights(folder: Path) -> dict[str, np.ndarray]:
    return load_file(str(folder / "model.safetensors"))


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_demo_subjects_are_split_train_validation_test(tmp_path, toy_pm):
    spec = toy_pm.resolve_modality("t1").item
    manifest = write_demo(tmp_path, {"t1": spec}, subjects=40)
    splits = [json.loads(line)["split"] for line in manifest.read_text().splitlines()]
    assert [splits.count(s) for s in ("train", "validation", "test")] == [28, 4, 8]
    # Too few subjects for a validation split: the test one is all there is held out.
    manifest = write_demo(tmp_path / "small", {"t1": spec}, subjects=5)
    splits = [json.loads(line)["split"] for line in manifest.read_text().splitlines()]
    assert [splits.count(s) for s in ("train", "validation", "test")] == [4, 0, 1]


def test_validation_records_choose_and_test_records_are_reported(demo_cache, toy_pm):
    from umbrella_core.train.run import prepare

    prep = prepare(load_config(None, SMALL), toy_pm, log=lambda _: None)
    assert prep.eval_set.name == "validation" and prep.test_set.name == "test"
    assert {r.split for r in prep.eval_set.records} == {"validation"}
    assert {r.split for r in prep.test_set.records} == {"test"}
    assert (len(prep.eval_set), len(prep.test_set)) == (2, 4)


def test_final_is_the_best_evaluated_weights_and_the_table_says_so(tmp_path, demo_cache, toy_pm):
    metrics, lines = _train(toy_pm, tmp_path / "best")
    best, final = metrics["best"], metrics["final"]
    assert best["step"] < metrics["steps"]  # else the test shows nothing
    assert final == {"weights": "best", **best, "split": "validation"}
    assert _same(_weights(tmp_path / "best" / "final"), _weights(tmp_path / "best" / "best"))
    recorded = json.loads((tmp_path / "best" / "metrics.json").read_text())
    assert recorded["final"] == final and recorded["held_out_split"] == "test"
    assert {r["n"] for r in metrics["held_out"].values()} == {2}  # the test records
    assert (
        f"test answers of final/ = best evaluated weights, step {best['step']}, "
        f"eval_loss {best['value']:.4f} on validation"
    ) in "\n".join(lines)

    # Off: final/ holds the last weights of the same run, which are not the best ones.
    metrics, lines = _train(toy_pm, tmp_path / "last", "trainer.load_best_at_end=false")
    assert metrics["best"] == {**best, "checkpoint": str(tmp_path / "last" / "best")}
    assert metrics["final"] == {"weights": "last", "step": metrics["steps"]}
    assert _same(_weights(tmp_path / "last" / "best"), _weights(tmp_path / "best" / "final"))
    assert not _same(_weights(tmp_path / "last" / "final"), _weights(tmp_path / "last" / "best"))
    assert f"test answers of final/ = last weights, step {metrics['steps']}" in "\n".join(lines)


def test_without_a_validation_split_the_held_out_records_do_both_and_final_is_last(
    tmp_path, toy_pm
):
    spec = toy_pm.resolve_modality("t1").item
    manifest = write_demo(tmp_path / "study", {"t1": spec}, subjects=10)
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    for record in records:
        record["split"] = "test" if record["split"] == "validation" else record["split"]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    metrics, lines = _train(
        toy_pm, tmp_path / "run", f"data.studies=[{manifest}]", "data.modalities=[t1]"
    )
    assert metrics["final"] == {"weights": "last", "step": metrics["steps"]}
    assert metrics["held_out_split"] == "held-out" and metrics["held_out"]["t1"]["n"] == 3
    text = "\n".join(lines)
    assert "final/ keeps the last weights" in text and "no validation split" in text
    assert f"held-out answers of final/ = last weights, step {metrics['steps']}" in text
