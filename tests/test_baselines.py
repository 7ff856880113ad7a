"""The simple baseline beside every figure: a linear model on regional features of the images.

Images are made in memory (a RecordDataset whose ``images`` draws them from
the subject's number), and the VLM's table is a stand-in that always answers
the commonest training answer, so that the tests need no language model.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from umbrella_core import Baseline, QuestionAnswers, hookimpl
from umbrella_core.commands.listing import plugins_listing
from umbrella_core.config import load_config
from umbrella_core.data.conversation import Tokenization
from umbrella_core.data.dataset import RecordDataset
from umbrella_core.default_plugins.baselines import REGIONAL
from umbrella_core.errors import ConfigError, DuplicateNameError, PluginError
from umbrella_core.evaluation.baselines import GRID, add_baselines
from umbrella_core.evaluation.engine import (
    Evaluation,
    index_questions,
    question_and_answer,
    spread_indices,
)
from umbrella_core.evaluation.report import format_table, summarize, write_report
from umbrella_core.testing import fresh_plugin_manager, toy_modality
from umbrella_core.types import ImageRef, ModalitySpec, StudyRecord, Turn

SIDE = "Which side is the blob on?"
BRIGHTNESS = "How bright is the blob?"
SPEC = toy_modality("t1", shape=(8, 8, 8), patch_size=(4, 4, 4))


def _truth(subject: int) -> tuple[str, float]:
    rng = np.random.default_rng(subject)
    return ("left" if rng.random() < 0.5 else "right"), float(rng.uniform(0.5, 2.0))


class Synthetic(RecordDataset):
    """Each subject's image: noise plus a blob of its brightness on its side (x < 4 is left)."""

    def images(self, record, window=None):
        subject = int(record.subject.removeprefix("s"))
        side, brightness = _truth(subject)
        out = []
        for image in record.images:
            spec = self.specs[image.modality]
            volume = np.random.default_rng(1000 + subject).normal(0, 0.3, spec.input_shape)
            half = spec.shape[0] // 2
            volume[:, :half] += brightness if side == "left" else 0.0
            volume[:, half:] += brightness if side == "right" else 0.0
            out.append((image.modality, torch.from_numpy(volume.astype(np.float32))))
        return out


def _record(subject: int, split: str, question: str, answer: str) -> StudyRecord:
    return StudyRecord(
        subject=f"s{subject}",
        split=split,
        images=[ImageRef(modality="t1", paths=f"/nowhere/s{subject}.nii.gz")],
        turns=[
            Turn(role="user", content=f"<image>\n{question}"),
            Turn(role="assistant", content=answer),
        ],
        source=f"manifest.jsonl:{subject}",
    )


def _records(sizes: dict[str, int], *, random_sides: bool = False) -> list[StudyRecord]:
    """Both questions of each subject; ``random_sides``: the side answer ignores the image."""
    records, subject = [], 0
    coin = np.random.default_rng(7)
    for split, n in sizes.items():
        for _ in range(n):
            side, brightness = _truth(subject)
            if random_sides:
                side = "left" if coin.random() < 0.5 else "right"
            records.append(_record(subject, split, SIDE, side))
            records.append(_record(subject, split, BRIGHTNESS, f"{brightness:.3f} units"))
            subject += 1
    return records


#: Baselines read images alone: no conversation is ever encoded.
NO_TEXT = Tokenization(
    tokenizer=None, image_token_id=0, tokens_per_modality={}, max_length=512, chat=None
)


def _dataset(records, name, spec=SPEC):
    return Synthetic(records, {spec.name: spec}, NO_TEXT, name=name)


def _stand_in_table(test_set, questions, max_samples=0):
    """The VLM's table, as evaluate_dataset shapes it, of a model answering the commonest
    training answer (probability 1)."""
    from collections import Counter

    groups: dict[tuple[str, str], list] = {}
    for index in spread_indices(len(test_set), max_samples):
        record = test_set.records[test_set.items[index][0]]
        question, _ = question_and_answer(record)
        groups.setdefault((record.modality_key, question), []).append(record)
    evaluation = Evaluation(results={})
    for (key, text), group in groups.items():
        asked = questions[text]
        common = Counter(asked.train_answers).most_common(1)[0][0]
        scored = asked.family.scoring == "candidates"
        answers = QuestionAnswers(
            question=text,
            modality_key=key,
            references=[r.turns[1].content for r in group],
            predictions=[common] * len(group),
            classes=asked.classes,
            probabilities=[tuple(float(c == common) for c in asked.classes)] * len(group)
            if scored
            else None,
            train_references=asked.train_answers,
            sources=[r.source for r in group],
        )
        result = evaluation.results.setdefault(
            key, {"n": 0, "loss": 1.0, "accuracy": None, "scored": 0, "exact": 0.0, "questions": {}}
        )
        result["n"] += len(group)
        result["questions"][text] = {
            "family": asked.family.name,
            "n": len(group),
            "metrics": dict(asked.family.compute(answers)),
        }
        evaluation.answers.append(answers)
        evaluation.families.append(asked.family)
    return evaluation


def _run(sizes, *, pm=None, mode="auto", random_sides=False, max_samples=0):
    pm = pm or fresh_plugin_manager()
    records = _records(sizes, random_sides=random_sides)
    questions = index_questions(records, pm.metric_families())
    by_split = {s: [r for r in records if r.split == s] for s in sizes}
    test_set = _dataset(by_split["test"], "test")
    validation = by_split.get("validation")
    evaluation = _stand_in_table(test_set, questions, max_samples)
    logged: list[str] = []
    add_baselines(
        evaluation,
        test_set=test_set,
        train_sets=[_dataset(by_split["train"], "train")],
        validation_set=_dataset(validation, "validation") if validation else None,
        questions=questions,
        baselines=pm.baselines(),
        mode=mode,
        max_samples=max_samples,
        log=logged.append,
    )
    return evaluation, logged


SIZES = {"train": 60, "validation": 12, "test": 30}


@pytest.fixture(scope="module")
def blob():
    return _run(SIZES)


def test_the_baseline_reads_a_linear_signal_and_stands_in_the_table(blob, tmp_path):
    evaluation, logged = blob
    side = evaluation.results["t1"]["questions"][SIDE]
    entry = side["baseline"]
    assert entry["name"] == "regional" and entry["model"] == "logistic regression"
    assert (entry["n_train"], entry["n_validation"]) == (60, 12)
    assert entry["representation"] == "t1: 64 regional means (4x4x4 grid, 1 channel)"
    assert entry["metrics"]["accuracy"] >= 0.9 and entry["metrics"]["auroc"] >= 0.9
    assert side["metrics"]["accuracy"] < 0.8  # the stand-in VLM: the commonest answer
    numeric = evaluation.results["t1"]["questions"][BRIGHTNESS]["baseline"]
    assert (
        numeric["model"] == "ridge regression" and numeric["regularisation"]["parameter"] == "alpha"
    )
    mae, mean_mae = numeric["metrics"]["mae"], numeric["metrics"]["reference"]["mae_train_mean"]
    assert mae < mean_mae / 3, numeric["metrics"]
    assert logged == [logged[0]] and logged[0].startswith("baselines: 2 fitted, 0 absent")
    # The table: a baseline column between the VLM's value and the reference, and its header.
    table = format_table(evaluation)
    header = next(line for line in table.splitlines() if line.startswith("modality"))
    assert header.split()[-3:] == ["value", "baseline", "reference"]
    assert "baseline regional: logistic regression (C), ridge regression (alpha) on 3D" in table
    row = next(line for line in table.splitlines() if "balanced accuracy" in line)
    assert f"{entry['metrics']['balanced_accuracy']:.1%}" in row.split("chance")[0]
    # Beside the metrics everywhere they go: trackers, metrics.json, one figure more.
    flat = summarize(evaluation.results, "test")
    assert (
        flat["test_baseline_accuracy/t1/which_side_is_the_blob_on"] == entry["metrics"]["accuracy"]
    )
    written = write_report(evaluation, tmp_path)
    assert json.loads(written["metrics"].read_text())["t1"]["questions"][SIDE]["baseline"] == entry
    names = sorted(p.name for p in written["figures"])
    assert "t1-how_bright_is_the_blob-numeric-baseline.png" in names
    assert "t1-which_side_is_the_blob_on-categorical-baseline.png" in names


def test_the_regularisation_is_the_one_validation_liked(blob):
    evaluation, _ = blob
    for question in (SIDE, BRIGHTNESS):
        chosen = evaluation.results["t1"]["questions"][question]["baseline"]["regularisation"]
        scores, grid = chosen["validation"], chosen["grid"]
        assert sorted(grid) == list(GRID) and len(scores) == len(grid)
        best = max(scores) if chosen["chosen_by"] == "validation accuracy" else min(scores)
        # The first best value, strongest regularisation first (ties keep the simpler model).
        assert chosen["value"] == grid[scores.index(best)]
    # A strong numeric signal: the heaviest shrinkage is not what validation picks.
    assert evaluation.results["t1"]["questions"][BRIGHTNESS]["baseline"]["regularisation"][
        "value"
    ] < max(GRID)


def test_answers_that_ignore_the_image_leave_the_baseline_near_chance():
    evaluation, _ = _run({"train": 60, "validation": 12, "test": 60}, random_sides=True)
    metrics = evaluation.results["t1"]["questions"][SIDE]["baseline"]["metrics"]
    assert 0.25 <= metrics["balanced_accuracy"] <= 0.75, metrics


def test_too_few_subjects_say_why_and_on_fits_anyway():
    sizes = {"train": 6, "validation": 4, "test": 8}
    evaluation, logged = _run(sizes)
    entry = evaluation.results["t1"]["questions"][SIDE]["baseline"]
    assert entry == {"name": "regional", "absent": "6 training samples (needs 10)"}
    assert logged[0].startswith("baselines: 0 fitted, 2 absent")
    table = format_table(evaluation)
    assert "(baseline regional: 6 training samples (needs 10))" in table
    assert "baseline  reference" not in table  # no column where none was fitted
    evaluation, _ = _run({"train": 6, "test": 8}, mode="on")
    entry = evaluation.results["t1"]["questions"][SIDE]["baseline"]
    assert entry["n_train"] == 6 and entry["n_validation"] == 0
    assert entry["regularisation"]["chosen_by"] == "default: no validation samples"


def test_off_adds_no_baseline_and_the_setting_is_checked():
    evaluation, logged = _run(SIZES, mode="off")
    assert not logged and not evaluation.baselines
    assert all("baseline" not in q for q in evaluation.results["t1"]["questions"].values())
    assert "baseline" not in format_table(evaluation)
    assert load_config(None, ["evaluation.baselines=off"]).evaluation["baselines"] == "off"
    assert load_config(None, []).evaluation.get("baselines", "auto") == "auto"
    with pytest.raises(ConfigError, match="evaluation.baselines: expected one of auto, on, off"):
        load_config(None, ["evaluation.baselines=sometimes"])


def test_the_same_held_out_samples_as_the_table():
    evaluation, _ = _run(SIZES, max_samples=25)  # 25 of the 60 items, spread
    assert {a.question for a in evaluation.answers} == {SIDE, BRIGHTNESS}
    for vlm in evaluation.answers:
        got = evaluation.baselines[("t1", vlm.question)]
        assert got.references == vlm.references and got.sources == vlm.sources
        assert len(got.predictions) == evaluation.results["t1"]["questions"][vlm.question]["n"]


class MeanIntensity:
    """A plugin's baseline: one number per image."""

    @hookimpl
    def umbrella_baselines(self):
        return [
            Baseline(
                name="mean-intensity",
                description="the image's mean",
                applies=lambda spec: spec.ndim == 3,
                features=lambda spec, image: np.array([image.mean()]),
            )
        ]


def test_a_plugin_baseline_is_asked_before_the_built_in_one():
    pm = fresh_plugin_manager(MeanIntensity())
    assert [p.item.name for p in pm.baselines()] == ["mean-intensity", "regional"]
    evaluation, _ = _run(SIZES, pm=pm)
    entry = evaluation.results["t1"]["questions"][SIDE]["baseline"]
    assert entry["name"] == "mean-intensity" and entry["plugin"] == "test-plugin-0"
    assert entry["representation"] == "t1: the image's mean"
    # umbrella plugins lists each plugin's baselines.
    infos = {info.name: info for info in pm.plugins()}
    assert infos["test-plugin-0"].baselines == ("mean-intensity",)
    assert infos["baselines"].baselines == ("regional",)
    assert "baselines: mean-intensity" in plugins_listing(pm).text


def test_a_baseline_name_two_plugins_give_is_refused_naming_both():
    pm = fresh_plugin_manager(MeanIntensity(), MeanIntensity())
    with pytest.raises(DuplicateNameError, match="test-plugin-0.*test-plugin-1|test-plugin-1.*0"):
        pm.baselines()


@pytest.mark.parametrize(
    ("features", "message"),
    [
        (lambda spec, image: image[0, 0], r"must be a non-empty 1-D array, got shape \(8, 8\)"),
        (lambda spec, image: np.full(3, np.nan), "hold NaN or infinite values"),
        (lambda spec, image: 1 / 0, "failed in features: ZeroDivisionError"),
    ],
    ids=["2-D", "NaN", "raises"],
)
def test_bad_features_are_an_error_naming_the_plugin(features, message):
    class Bad:
        @hookimpl
        def umbrella_baselines(self):
            return [Baseline(name="bad", applies=lambda spec: True, features=features)]

    with pytest.raises(PluginError, match=message) as caught:
        _run(SIZES, pm=fresh_plugin_manager(Bad()))
    assert "baseline 'bad' of plugin 'test-plugin-0' (distribution test-dist-0 0.0)" in str(
        caught.value
    )


def test_a_4d_series_gives_the_correlations_of_its_regions():
    spec = ModalitySpec(
        name="bold", ndim=4, shape=(9, 9, 9, 12), patch_size=(3, 3, 3, 4), channels=2, load=None
    )
    pm = fresh_plugin_manager()
    (chosen,) = [p for p in pm.baselines() if p.item.applies(spec)][:1]
    assert chosen.item is REGIONAL
    image = np.random.default_rng(0).normal(size=spec.input_shape).astype(np.float32)
    regions = 2 * 27  # 3x3x3 per channel
    features = REGIONAL.features(spec, image)
    assert features.shape == (regions * (regions - 1) // 2,) and np.isfinite(features).all()
    assert REGIONAL.describe(spec).startswith(f"{regions * (regions - 1) // 2} Fisher-z")
    # Two regions whose series move together correlate strongly.
    image[:, :3] = np.linspace(0, 1, 12, dtype=np.float32)
    assert np.tanh(REGIONAL.features(spec, image)).max() > 0.99


def test_the_model_card_shows_the_baseline_beside_each_figure(blob):
    from umbrella_core.export.model_card import render_card

    evaluation, _ = blob
    results = json.loads(json.dumps(evaluation.results))
    results["t1"]["questions"][BRIGHTNESS]["baseline"] = {"name": "regional", "absent": "why not"}
    meta = {
        "modalities": [{"name": "t1", "channels": 1, "shape": [8, 8, 8], "patch_size": [4, 4, 4]}],
        "evaluation": {"results": results, "source": "umbrella evaluate"},
    }
    card = render_card(meta, name="export", families=fresh_plugin_manager().metric_families())
    assert "| modality | question | n | metric | value | baseline | reference |" in card
    side = evaluation.results["t1"]["questions"][SIDE]
    accuracy = f"{side['baseline']['metrics']['balanced_accuracy']:.1%}"
    assert (
        f"| balanced accuracy | {side['metrics']['balanced_accuracy']:.1%} | {accuracy} |" in card
    )
    assert "The baseline column is `regional`: a linear model" in card
    assert f"- t1, {BRIGHTNESS}: why not" in card


def test_a_sample_of_several_images_concatenates_their_features():
    dmri = toy_modality("dmri", shape=(8, 8, 8), patch_size=(4, 4, 4), channels=2)
    records = [
        StudyRecord(
            subject=f"s{i}",
            split=split,
            images=[
                ImageRef(modality=m, paths=f"/nowhere/{m}-s{i}.nii.gz") for m in ("t1", "dmri")
            ],
            turns=[
                Turn(role="user", content=f"<image><image>\n{SIDE}"),
                Turn(role="assistant", content=_truth(i)[0]),
            ],
        )
        for i, split in enumerate(["train"] * 16 + ["validation"] * 4 + ["test"] * 8)
    ]
    pm = fresh_plugin_manager()
    questions = index_questions(records, pm.metric_families())
    specs = {"t1": SPEC, "dmri": dmri}

    def dataset(split):
        mine = [r for r in records if r.split == split]
        return Synthetic(mine, specs, NO_TEXT)

    test_set = dataset("test")
    evaluation = _stand_in_table(test_set, questions)
    add_baselines(
        evaluation,
        test_set=test_set,
        train_sets=[dataset("train")],
        validation_set=dataset("validation"),
        questions=questions,
        baselines=pm.baselines(),
        log=lambda _: None,
    )
    entry = evaluation.results["t1+dmri"]["questions"][SIDE]["baseline"]
    assert entry["representation"] == (
        "t1: 64 regional means (4x4x4 grid, 1 channel); "
        "dmri: 128 regional means (4x4x4 grid, 2 channels)"
    )
    assert entry["n_train"] == 16 and entry["metrics"]["n"] == 8
