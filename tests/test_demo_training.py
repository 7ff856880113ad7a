"""The quick start's job: ``umbrella train --modalities t1,dmri`` on the built-in demo.

It must finish on CPU, say where its TensorBoard logs and checkpoint are,
answer the held-out demo questions (which hemisphere holds the lesion?) with at
least 90% accuracy per modality, where chance is 50%, and give the lesion
centre's x coordinate with less than half the error of always answering the
training mean.

Not only on one machine: the CPU and its thread count change the order in
which floats are summed, and so the run. benchmarks/demo_seeds.py runs the demo
for seeds 0-4 with 1 and 2 torch threads; every one of those runs clears 90%
(its table is in benchmarks/README.md). This test runs seed 0 with 2 threads,
one of those runs, rather than with as many threads as the CI machine has.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
from pathlib import Path

import pytest

from umbrella_core.model.build import load_checkpoint
from umbrella_core.plugins import get_plugin_manager

pytestmark = pytest.mark.slow


# demo_run (tests/conftest.py): the quick start's run, shared with the serve tests.


HEMISPHERE = "Which hemisphere holds the lesion?"
POSITION = "What is the RAS x coordinate of the centre of the lesion, in cm?"


def test_demo_learns_from_the_images(demo_run):
    run_dir, stdout = demo_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    held_out = metrics["held_out"]
    assert set(held_out) == {"t1", "dmri"}
    for modality, result in held_out.items():
        side = result["questions"][HEMISPHERE]
        assert side["n"] >= 20 and side["family"] == "categorical"
        assert side["metrics"]["accuracy"] >= 0.9, (modality, result, stdout)
        assert side["metrics"]["balanced_accuracy"] >= 0.9, (modality, result, stdout)
        # The numeric question: clearly better than always answering the training mean.
        where = result["questions"][POSITION]
        assert where["family"] == "numeric" and where["metrics"]["unparsed"] == 0
        mae, reference = where["metrics"]["mae"], where["metrics"]["reference"]["mae_train_mean"]
        assert mae < reference / 2, (modality, where, stdout)


def test_demo_says_its_answers_and_ends_its_turn(demo_run):
    # I13: what the table reports is what `umbrella generate` prints. The likelihood picks
    # the right side; the model must also say it and stop (seed 0: every answer, both
    # modalities; the margins are for other CPUs and seeds).
    run_dir, stdout = demo_run
    held_out = json.loads((run_dir / "metrics.json").read_text())["held_out"]
    for modality, result in held_out.items():
        for question in (HEMISPHERE, POSITION):
            q = result["questions"][question]
            assert q["metrics"]["ended"] >= 0.9, (modality, question, q, stdout)
            assert q["metrics"]["parsed"] >= 0.9, (modality, question, q, stdout)
            assert q["flag"] is None or f'! {modality} "{question}": {q["flag"]}' in stdout
        side = result["questions"][HEMISPHERE]["metrics"]
        assert side["generated_accuracy"] >= 0.85, (modality, side, stdout)
        assert re.search(rf"generated accuracy\s+{side['generated_accuracy']:.1%}\s", stdout)
        assert re.search(rf"likelihood accuracy\s+{side['accuracy']:.1%}\s", stdout)


def test_demo_table_shows_each_figure_beside_its_reference(demo_run):
    run_dir, stdout = demo_run
    held_out = json.loads((run_dir / "metrics.json").read_text())["held_out"]
    for result in held_out.values():
        side = result["questions"][HEMISPHERE]["metrics"]
        # The VLM's figure, the baseline's, the reference.
        base = result["questions"][HEMISPHERE]["baseline"]["metrics"]
        accuracy = (
            rf"accuracy\s+{side['accuracy']:.1%}\s+{base['accuracy']:.1%}\s+"
            r"majority \((left|right)\) "
        )
        assert re.search(accuracy + rf"{side['reference']['majority_accuracy']:.1%}", stdout)
        where = result["questions"][POSITION]["metrics"]
        base = result["questions"][POSITION]["baseline"]["metrics"]
        mae = rf"MAE\s+{where['mae']:.3f}\s+{base['mae']:.3f}\s+training mean \(-?[\d.]+\) "
        assert re.search(mae + f"{where['reference']['mae_train_mean']:.3f}", stdout)
    assert stdout.count("chance 50.0%") == 2


def test_demo_table_stands_each_figure_beside_a_regional_baseline(demo_run):
    run_dir, stdout = demo_run
    held_out = json.loads((run_dir / "metrics.json").read_text())["held_out"]
    for modality, result in held_out.items():
        for question in (HEMISPHERE, POSITION):
            entry = result["questions"][question]["baseline"]
            assert entry["name"] == "regional" and entry["fitted_on"] == "train", entry
            assert entry["n_train"] >= 100 and entry["n_validation"] >= 10, entry
            assert entry["metrics"]["n"] == result["questions"][question]["n"]
        # The phantom's lesion brightens the regions of its hemisphere: a linear signal.
        side = result["questions"][HEMISPHERE]["baseline"]["metrics"]
        assert side["accuracy"] >= 0.8, (modality, side, stdout)
    assert "baseline regional: logistic regression (C), ridge regression (alpha)" in stdout


def test_demo_reports_the_best_validation_weights_on_the_test_records(demo_run):
    from safetensors.numpy import load_file

    run_dir, stdout = demo_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    final, best = metrics["final"], metrics["best"]
    assert metrics["held_out_split"] == "test"
    assert final["weights"] == "best" and final["split"] == "validation"
    assert (final["step"], final["value"]) == (best["step"], best["value"])
    # final/ holds the weights of best/ (trainer.load_best_at_end), and says so above the table.
    a = load_file(str(run_dir / "final" / "model.safetensors"))
    b = load_file(str(run_dir / "best" / "model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    line = (
        f"test answers of final/ = best evaluated weights, step {best['step']}, "
        f"eval_loss {best['value']:.4f} on validation"
    )
    assert line in stdout, stdout


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
