"""The evaluation engine: candidate scoring, batched decoding, metric families and the hook."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from umbrella_core import MetricFamily, QuestionAnswers, hookimpl
from umbrella_core.data.collate import UmbrellaCollator
from umbrella_core.data.conversation import Tokenization, default_chat_format
from umbrella_core.data.dataset import RecordDataset
from umbrella_core.evaluation.engine import (
    evaluate_dataset,
    index_questions,
    not_ending_flag,
    spread_indices,
)
from umbrella_core.evaluation.report import format_table, summarize
from umbrella_core.inference.generate import decode, greedy_generate, greedy_generate_batch
from umbrella_core.model.build import build_model, load_base
from umbrella_core.testing import ToyModalityPlugin, fresh_plugin_manager, toy_modality
from umbrella_core.types import ImageRef, StudyRecord, Turn


class ImagesInMemory(RecordDataset):
    """A RecordDataset whose images are fixed random tensors (one per record), not files."""

    def images(self, record, window=None):
        seed = int(record.subject.removeprefix("s"))
        g = torch.Generator().manual_seed(seed)
        return [
            (image.modality, torch.randn(self.specs[image.modality].input_shape, generator=g))
            for image in record.images
        ]


def _record(subject, modality, question, answer, split="test"):
    return StudyRecord(
        subject=subject,
        split=split,
        images=[ImageRef(modality=modality, paths=f"/nowhere/{subject}.nii.gz")],
        turns=[
            Turn(role="user", content=f"<image>\n{question}"),
            Turn(role="assistant", content=answer),
        ],
        source=f"manifest.jsonl:{subject}",
    )


@pytest.fixture(scope="module")
def toy():
    specs = {"a": toy_modality("a"), "b": toy_modality("b")}
    pm = fresh_plugin_manager(ToyModalityPlugin(*specs.values()))
    torch.manual_seed(0)
    llava, tokenizer, _ = load_base("tiny")
    model = build_model(llava, specs, pm.patch_embedder)
    model.eval()
    return pm, specs, model, tokenizer


def _dataset(toy, records):
    _, specs, model, tokenizer = toy
    return ImagesInMemory(
        records, specs, Tokenization.of(tokenizer, model.image_token_id, specs, 512)
    )


def _records():
    side = [
        _record(f"s{i}", "ab"[i % 2], "Which side?", ["left", "right", "middle"][i % 3])
        for i in range(9)
    ]
    age = [_record(f"s{i}", "ab"[i % 2], "How old?", f"{40 + 3 * i} years") for i in range(9, 15)]
    train = [_record(f"s{i}", "a", "Which side?", "left", split="train") for i in range(15, 18)]
    return side + age, train


def test_batched_greedy_decoding_gives_each_row_its_own_greedy_answer(toy):
    _, _, model, tokenizer = toy
    records, _ = _records()
    dataset = _dataset(toy, records[:3] + records[-2:])
    prompts, images = [], []
    for record in dataset.records:
        prompts.append(dataset.encode(record, add_generation_prompt=True).input_ids)
        images.append(dataset.images(record))
    # Different lengths: the rows are left-padded differently.
    prompts[1] = prompts[1][:3] + prompts[1][3:]
    assert len({len(p) for p in prompts}) > 1
    batched = greedy_generate_batch(
        model, prompts, images, max_new_tokens=6, pad_token_id=tokenizer.pad_token_id
    )
    alone = [
        greedy_generate(model, p, i, max_new_tokens=6) for p, i in zip(prompts, images, strict=True)
    ]
    assert batched == alone
    assert all(len(ids) == 6 for ids in batched)  # no stop token given: every step runs


def test_candidates_are_scored_by_their_summed_log_probability(toy):
    pm, _, model, tokenizer = toy
    records, train = _records()
    dataset = _dataset(toy, records)
    families = pm.metric_families()
    questions = index_questions(records + train, families)
    assert questions["Which side?"].family.name == "categorical"
    assert questions["Which side?"].classes == ("left", "middle", "right")
    assert questions["How old?"].family.name == "numeric"
    collator = UmbrellaCollator(tokenizer.pad_token_id, tuple(model.specs))
    evaluation = evaluate_dataset(model, dataset, collator, questions, batch_size=4)
    by_source = {s["source"]: s for s in evaluation.samples}
    for record in records[:9]:
        sample = by_source[record.source]
        # By hand: one full forward per candidate, log-softmax at the answer positions.
        logp = []
        for candidate in ("left", "middle", "right"):
            turns = [record.turns[0], Turn(role="assistant", content=candidate)]
            encoded = dataset.encode(StudyRecord(**{**_fields(record), "turns": turns}))
            batch = collator(
                [{"input_ids": encoded.input_ids, "labels": encoded.labels,
                  "images": dataset.images(record), "key": record.modality_key}]
            )  # fmt: skip
            with torch.no_grad():
                logits = model(**batch).logits[0, :-1].float()
            target = batch["labels"][0, 1:]
            learned = (target != -100).nonzero().flatten()
            logp.append(float(torch.log_softmax(logits, -1)[learned, target[learned]].sum()))
        expected = [math.exp(v - max(logp)) for v in logp]
        expected = [v / sum(expected) for v in expected]
        assert sample["probabilities"] == pytest.approx(expected, abs=1e-4)
        assert sample["answer"] == ("left", "middle", "right")[expected.index(max(expected))]
    # Numeric answers are decoded greedily, for up to twice the longest answer's tokens
    # (with its end) or 8 more, whichever is more.
    longest = len(tokenizer("82 years", add_special_tokens=False)["input_ids"]) + 1
    for record in records[9:]:
        prompt = dataset.encode(record, add_generation_prompt=True).input_ids
        ids = greedy_generate(
            model, prompt, dataset.images(record), max_new_tokens=max(2 * longest, longest + 8),
            stop_token_ids=[tokenizer.eos_token_id],
        )  # fmt: skip
        assert (
            by_source[record.source]["answer"]
            == tokenizer.decode(ids, skip_special_tokens=True).strip()
        )
    # Categorical questions get a generated answer too, within their own budget
    # ("middle" and its end, twice, or 8 more), beside the most probable candidate.
    longest = len(tokenizer("middle", add_special_tokens=False)["input_ids"]) + 1
    stops = default_chat_format(tokenizer).stop_token_ids
    for record in records[:9]:
        sample = by_source[record.source]
        assert sample["max_new_tokens"] == max(2 * longest, longest + 8)
        prompt = dataset.encode(record, add_generation_prompt=True).input_ids
        ids = greedy_generate(
            model, prompt, dataset.images(record), max_new_tokens=sample["max_new_tokens"],
            stop_token_ids=stops,
        )  # fmt: skip
        assert sample["generated"] == decode(tokenizer, ids)
        assert sample["ended"] == (ids[-1] in stops)
        assert sample["answer"] in ("left", "middle", "right")  # the likelihood's, as before
    # Per key: the categorical samples' accuracy; per question the family's metrics.
    for key in ("a", "b"):
        r = evaluation.results[key]
        mine = [s for s in evaluation.samples if s["key"] == key and "probabilities" in s]
        assert r["scored"] == len(mine)
        assert r["accuracy"] == sum(s["answer"] == s["reference"] for s in mine) / len(mine)
        assert r["questions"]["Which side?"]["family"] == "categorical"
        assert r["questions"]["How old?"]["family"] == "numeric"
        side = r["questions"]["Which side?"]["metrics"]
        assert side["reference"]["majority_class"] == "left"  # the training answers
        assert "mae" in r["questions"]["How old?"]["metrics"]
        said = [s["ended"] and s["generated"] == s["reference"] for s in mine]
        assert r["generated_accuracy"] == side["generated_accuracy"] == sum(said) / len(said)
        for question in ("Which side?", "How old?"):
            q = r["questions"][question]
            ended = [
                s["ended"]
                for s in evaluation.samples
                if s["key"] == key and s["question"] == question
            ]
            assert q["metrics"]["n_ended"] == sum(ended) and q["metrics"]["ended"] is not None
            assert 0 <= q["metrics"]["parsed"] <= 1
    flat = summarize(evaluation.results)
    # (An untrained model answers no number: MAE is undefined, the unparsed share 1.)
    assert flat["eval_unparsed/a/how_old"] == 1.0 and "eval_mae/a/how_old" not in flat
    assert "eval_balanced_accuracy/b/which_side" in flat
    table = format_table(evaluation)
    assert "balanced accuracy" in table and "MAE" in table and "training mean" in table


def _fields(record):
    import attrs

    return attrs.asdict(record, recurse=False)


def test_max_samples_spreads_over_the_held_out_set():
    assert spread_indices(10, 0) == list(range(10))
    assert spread_indices(10, 5) == [0, 2, 4, 6, 8]
    assert spread_indices(3, 5) == [0, 1, 2]
    picked = spread_indices(1000, 7)
    assert len(picked) == 7 and picked[-1] >= 800


class RatingScale:
    """A study plugin's family for its own task: a clinical rating scale."""

    seen: list[QuestionAnswers] = []

    @hookimpl
    def umbrella_metrics(self, settings):
        def compute(answers):
            RatingScale.seen.append(answers)
            within = [
                abs(int(r.split()[0]) - int(p.split()[0])) <= settings.get("tolerance", 1)
                if p.split() and p.split()[0].isdigit()
                else False
                for r, p in zip(answers.references, answers.predictions, strict=True)
            ]
            return {"within_tolerance": sum(within) / len(within)}

        return [
            MetricFamily(
                name="rating",
                applies=lambda question, answers: "rating" in question.lower(),
                compute=compute,
                scoring="generate",
            )
        ]


def test_a_plugin_family_scores_its_questions_before_the_built_in_ones(toy):
    _, specs, model, tokenizer = toy
    pm = fresh_plugin_manager(ToyModalityPlugin(*specs.values()), RatingScale())
    records = [_record(f"s{i}", "a", "What is the rating?", f"{i % 3} points") for i in range(6)]
    records += [
        _record(f"s{i}", "a", "Which side?", "left right".split()[i % 2]) for i in range(6, 10)
    ]
    questions = index_questions(records, pm.metric_families({"tolerance": 2}))
    assert questions["What is the rating?"].family.name == "rating"
    assert questions["Which side?"].family.name == "categorical"
    collator = UmbrellaCollator(tokenizer.pad_token_id, tuple(model.specs))
    evaluation = evaluate_dataset(model, _dataset(toy, records), collator, questions)
    (answers,) = RatingScale.seen
    assert answers.references == tuple(f"{i % 3} points" for i in range(6))
    assert len(answers.predictions) == 6 and answers.probabilities is None
    rating = evaluation.results["a"]["questions"]["What is the rating?"]
    assert rating["family"] == "rating" and 0 <= rating["metrics"]["within_tolerance"] <= 1
    assert "within_tolerance" in format_table(evaluation)
    listed = {p.name: p.hooks for p in pm.plugins()}
    assert any("umbrella_metrics" in hooks for hooks in listed.values())


class Lenient:
    """A plugin family that says every answer ended and parsed."""

    @hookimpl
    def umbrella_metrics(self):
        return [
            MetricFamily(
                name="lenient",
                applies=lambda question, answers: "rating" in question.lower(),
                compute=lambda answers: {"score": 1.0, "ended": 1.0, "parsed": 1.0},
                scoring="generate",
            )
        ]


@contextlib.contextmanager
def never_ending(model, stops):
    """``model`` never choosing a stop token while decoding: it never ends its turn."""

    def hook(module, args, output):
        # Decoding's logits are (rows, positions, vocabulary); teacher-forced rows are 2D.
        if output.dim() == 3:
            output = output.clone()
            output[..., list(stops)] = torch.finfo(output.dtype).min
        return output

    handle = model.llava.get_output_embeddings().register_forward_hook(hook)
    try:
        yield model
    finally:
        handle.remove()


def test_a_model_that_never_ends_is_flagged_whatever_its_family_says(toy):
    _, specs, model, tokenizer = toy
    pm = fresh_plugin_manager(ToyModalityPlugin(*specs.values()), Lenient())
    records = [_record(f"s{i}", "a", "What is the rating?", f"{i % 3} points") for i in range(6)]
    records += [_record(f"s{i}", "a", "Which side?", "left right".split()[i % 2]) for i in (6, 7)]
    records += [_record(f"s{i}", "a", "Which side?", "right", split="train") for i in (8, 9)]
    questions = index_questions(records, pm.metric_families())
    collator = UmbrellaCollator(tokenizer.pad_token_id, tuple(model.specs))
    with never_ending(model, default_chat_format(tokenizer).stop_token_ids):
        evaluation = evaluate_dataset(model, _dataset(toy, records[:8]), collator, questions)
    assert all(s["ended"] is False and s["generated"] for s in evaluation.samples)
    result = evaluation.results["a"]["questions"]
    rating = result["What is the rating?"]
    # The family's own figures stay, except "ended", which the decoding decides.
    assert rating["metrics"]["score"] == 1.0 and rating["metrics"]["parsed"] == 1.0
    assert rating["metrics"]["ended"] == 0.0 and rating["metrics"]["n_ended"] == 0
    side = result["Which side?"]
    assert side["metrics"]["ended"] == side["metrics"]["generated_accuracy"] == 0.0
    table = format_table(evaluation).splitlines()
    said = "the model does not end its turn (a model composed from a language model needs its "
    said += "second stage: see README)"
    assert table[-2:] == [
        f'! a "What is the rating?": 6 of 6 generated answers did not end within '
        f"{rating['max_new_tokens']} tokens: {said}",
        f'! a "Which side?": 2 of 2 generated answers did not end within '
        f"{side['max_new_tokens']} tokens: {said}",
    ]
    assert rating["flag"] == table[-2].split(": ", 1)[1]
    # The table shows the decoding's "ended" for the plugin's family too.
    assert any(line.split()[-2:] == ["ended", "0.0%"] for line in table)


def test_a_few_answers_that_do_not_end_are_counted_and_many_flagged():
    assert not_ending_flag(48, 48, 12) is None
    assert not_ending_flag(48, 44, 12) is None  # fewer than 10%: the "ended" row says it
    assert not_ending_flag(48, 40, 12) == "8 of 48 generated answers did not end within 12 tokens"
    assert not_ending_flag(48, 7, 12).startswith(
        "41 of 48 generated answers did not end within 12 tokens: the model does not end its turn"
    )
    assert not_ending_flag(0, 0, 12) is None


def test_categorical_answers_are_scored_by_likelihood_and_by_what_the_model_says():
    from umbrella_core.default_plugins.metrics import CATEGORICAL

    answers = QuestionAnswers(
        question="Which hemisphere holds the lesion?",
        modality_key="t1",
        references=["left", "right", "left", "right"],
        # The most probable candidate is right every time ...
        predictions=["left", "right", "left", "right"],
        classes=["left", "right"],
        probabilities=[[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]],
        train_references=["left", "left", "right"],
        # ... but the model says so and stops once, runs on twice, and once says another case.
        generated=["left", "rightrightrightright", "leftleftleftleft", "Right"],
        ended=[True, False, False, True],
    )
    metrics = CATEGORICAL.compute(answers)
    assert metrics["accuracy"] == 1.0 and metrics["auroc"] == 1.0
    assert metrics["generated_accuracy"] == 0.25
    assert (metrics["ended"], metrics["parsed"]) == (0.5, 0.25)
    rows = {label: (value, ref) for label, value, ref in CATEGORICAL.table(metrics)}
    assert rows["likelihood accuracy"] == ("100.0%", "majority (left) 50.0%")
    assert rows["generated accuracy"] == ("25.0%", "majority (left) 50.0%")
    assert rows["ended"][0] == "50.0%" and rows["parsed"][0] == "25.0%"
    # A table written before answers were generated keeps its one accuracy row.
    old = {k: v for k, v in metrics.items() if k not in ("generated_accuracy", "ended", "parsed")}
    labels = [label for label, _, _ in CATEGORICAL.table(old)]
    assert labels[:2] == ["accuracy", "balanced accuracy"]
    with pytest.raises(ValueError, match="one generated answer and one flag per reference"):
        QuestionAnswers(question="?", modality_key="t1", references=["a"], predictions=["a"],
                        generated=["a"], ended=[])  # fmt: skip


def test_a_metric_family_that_is_not_one_is_refused_naming_the_plugin():
    from umbrella_core.errors import PluginError

    class Broken:
        @hookimpl
        def umbrella_metrics(self):
            return [{"name": "oops"}]

    pm = fresh_plugin_manager(Broken())
    with pytest.raises(PluginError, match="umbrella_metrics must return MetricFamily"):
        pm.metric_families()


# The process under test: `umbrella train`, whose final evaluation (of the test
# records) says so and then hangs, as one of 40,000 records would seem to.
HANGING_FINAL_EVALUATION = """
import sys, time
import umbrella_core.evaluation.engine as engine

evaluate_dataset = engine.evaluate_dataset

def hanging(*args, description="", **kwargs):
    if description == "evaluating test":
        print("FINAL EVALUATION STARTED", flush=True)
        time.sleep(600)
    return evaluate_dataset(*args, description=description, **kwargs)

engine.evaluate_dataset = hanging
from umbrella_core.commands import main
sys.exit(main(sys.argv[1:]))
"""

SMALL = [
    "--modalities", "t1", "--demo-subjects", "11", "--max-steps", "4", "--batch-size", "4",
    "--no-progress", "--set", "data.geometry={t1: {shape: [16, 16, 16], patch_size: [8, 8, 8]}}",
]  # fmt: skip


@pytest.mark.slow
def test_a_killed_final_evaluation_leaves_final_and_metrics(tmp_path):
    import json
    import os
    import signal
    import subprocess
    import sys

    from safetensors.numpy import load_file

    from umbrella_core.model.build import load_checkpoint
    from umbrella_core.plugins import get_plugin_manager

    out = tmp_path / "run"
    env = {**os.environ, "UMBRELLA_CACHE": str(tmp_path / "cache")}
    process = subprocess.Popen(
        [sys.executable, "-c", HANGING_FINAL_EVALUATION, "train", *SMALL, "--output-dir", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    said = []
    for line in process.stdout:
        said.append(line)
        if line.startswith("FINAL EVALUATION STARTED"):
            break
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    # 2 test subjects, each asked the hemisphere and the diameter of the lesion.
    assert any(line.startswith("evaluating final/ on 4 test samples") for line in said), said
    # The weights are there, complete, and are the best evaluated ones.
    model, _, meta = load_checkpoint(out / "final", get_plugin_manager())
    assert meta["metrics"]["final"]["weights"] == "best"
    best = load_file(str(out / "best" / "model.safetensors"))
    final = load_file(str(out / "final" / "model.safetensors"))
    assert best.keys() == final.keys() and all((best[k] == final[k]).all() for k in best)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 4 and "held_out" not in metrics


@pytest.mark.slow
def test_eval_strategy_end_evaluates_once_and_no_not_at_all(tmp_path, monkeypatch):
    import json

    from umbrella_core.commands import main

    monkeypatch.setenv("UMBRELLA_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "end"
    assert (
        main(["train", *SMALL, "--output-dir", str(out), "--set", "trainer.eval_strategy=end"]) == 0
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert "best" not in metrics and metrics["held_out_split"] == "test"
    assert not (out / "best").exists()
    # The table of the test records is in final/'s metadata too.
    meta = json.loads((out / "final" / "umbrella.json").read_text())
    assert meta["metrics"]["held_out"] == metrics["held_out"]
    out = tmp_path / "no"
    assert (
        main(["train", *SMALL, "--output-dir", str(out), "--set", "trainer.eval_strategy=no"]) == 0
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert "held_out" not in metrics and "best" not in metrics
    assert (out / "final" / "model.safetensors").is_file()


@pytest.mark.slow
def test_eval_max_samples_bounds_evaluation_during_training_not_the_table(tmp_path, monkeypatch):
    import umbrella_core.evaluation.engine as engine
    from umbrella_core.commands import main

    monkeypatch.setenv("UMBRELLA_CACHE", str(tmp_path / "cache"))
    asked: list[tuple[int, int]] = []
    spread = engine.spread_indices

    def recording(n, limit):
        asked.append((n, limit))
        return spread(n, limit)

    monkeypatch.setattr(engine, "spread_indices", recording)
    args = [*SMALL, "--output-dir", str(tmp_path / "run"), "--demo-subjects", "20"]
    args += ["--set", "trainer.eval_strategy=steps", "--set", "trainer.eval_steps=2"]
    assert main(["train", *args, "--set", "trainer.eval_max_samples=3"]) == 0
    # 20 subjects: 2 validation and 4 test ones, each asked two questions.
    assert asked == [(4, 3), (4, 3), (8, 0)]


def test_free_text_is_scored_beside_the_commonest_training_answer():
    from umbrella_core.default_plugins.metrics import TEXT

    answers = QuestionAnswers(
        question="Describe the scan.",
        modality_key="t1",
        references=["no lesion", "a lesion on the left", "no lesion"],
        predictions=["no lesion", "a lesion on the right", "a lesion"],
        train_references=["no lesion", "a lesion", "no lesion"],
    )
    metrics = TEXT.compute(answers)
    # Exact match: 1 of 3; always "no lesion" (the commonest training answer): 2 of 3.
    assert metrics["exact_match"] == pytest.approx(1 / 3)
    reference = metrics["reference"]
    assert reference["common_answer"] == "no lesion"
    assert reference["exact_match"] == pytest.approx(2 / 3)
    # ROUGE-L F of "no lesion" against each reference: 1, 2*(1/2*1/5)/(1/2+1/5) = 2/7, 1.
    assert reference["rouge_l"] == pytest.approx((1 + 2 / 7 + 1) / 3)
    rows = {label: (value, ref) for label, value, ref in TEXT.table(metrics)}
    assert rows["exact match"] == ("33.3%", "commonest training answer 66.7%")
