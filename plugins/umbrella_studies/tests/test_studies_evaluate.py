"""A miniature BIDS study of real T1 scans, trained on and evaluated with its sex and age tasks."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from umbrella_core.commands import main

SUBJECTS = 20


@pytest.fixture
def real_bids(tmp_path, text, jsonfile) -> Path:
    """20 subjects, each with nibabel's real T1 (a real scan, so the loader does real work)."""
    nibabel_testing = pytest.importorskip("nibabel.testing")
    anatomical = Path(nibabel_testing.data_path) / "anatomical.nii"
    root = tmp_path / "bids"
    rows = ["participant_id\tsex\tage"]
    for i in range(1, SUBJECTS + 1):
        folder = root / f"sub-{i:02d}" / "anat"
        folder.mkdir(parents=True)
        shutil.copy(anatomical, folder / f"sub-{i:02d}_T1w.nii")
        rows.append(f"sub-{i:02d}\t{'MF'[i % 2]}\t{20 + 2.5 * i}")
    text(root / "participants.tsv", "\n".join(rows) + "\n")
    jsonfile(root / "dataset_description.json", {"Name": "real", "BIDSVersion": "1.8.0"})
    return root


@pytest.mark.slow
def test_umbrella_evaluate_scores_the_sex_and_age_tasks_of_a_bids_study(
    real_bids, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("UMBRELLA_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(
        json.dumps(
            {
                "data": {
                    "modalities": ["t1"],
                    "studies": [{"location": f"bids:{real_bids}", "tasks": ["sex", "age"]}],
                    "geometry": {"t1": {"shape": [16, 16, 16], "patch_size": [8, 8, 8]}},
                    "split": {"test": 0.2, "validation": 0.1},
                },
                "trainer": {
                    "max_steps": 4,
                    "batch_size": 4,
                    "output_dir": str(out),
                    "progress": False,
                },
            }
        )
    )
    assert main(["train", "--config", str(config)]) == 0
    printed = capsys.readouterr().out
    # No subject's records on two sides of the split the run made and wrote down.
    with (out / "split.tsv").open() as f:
        sides = {row["subject"]: row["split"] for row in csv.DictReader(f, delimiter="\t")}
    assert len(sides) == SUBJECTS
    assert sorted(sides.values()).count("test") == 4  # 20 % of 20 subjects
    assert "What is the sex of this subject?" in printed and "How old is the subject?" in printed

    assert main(["evaluate", "--checkpoint", str(out / "final"), "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    questions = results["t1"]["questions"]
    sex = questions["What is the sex of this subject?"]
    age = questions["How old is the subject?"]
    assert sex["family"] == "categorical" and sex["n"] == 4
    assert age["family"] == "numeric" and age["n"] == 4
    for name in ("accuracy", "balanced_accuracy", "macro_f1", "auroc", "confusion"):
        assert name in sex["metrics"]
    assert sex["metrics"]["reference"]["chance"] == 0.5
    assert sum(map(sum, sex["metrics"]["confusion"]["matrix"])) == 4
    for name in ("mae", "rmse", "pearson_r", "r2", "unparsed"):
        assert name in age["metrics"]
    # The training-mean reference is the mean age of the training subjects, by hand.
    with (real_bids / "participants.tsv").open() as f:
        ages = {r["participant_id"]: float(r["age"]) for r in csv.DictReader(f, delimiter="\t")}
    train_ages = [round(ages[s] + 1e-9) for s, side in sides.items() if side == "train"]
    expected = sum(int(a) for a in train_ages) / len(train_ages)
    assert age["metrics"]["reference"]["train_mean"] == pytest.approx(expected, abs=0.51)
    written = out / "final" / "evaluation-test"
    figures = sorted(p.name for p in (written / "figures").glob("*.png"))
    assert figures == [
        "t1-how_old_is_the_subject-numeric.png",
        "t1-what_is_the_sex_of_this_subject-categorical.png",
    ]
    assert json.loads((written / "metrics.json").read_text()) == results
