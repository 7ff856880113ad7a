"""Held-out evaluation in one pass: loss, the model's answers, and each question's metrics.

Every held-out question is scored by a metric family (the ``umbrella_metrics``
hook; built-ins in :mod:`umbrella_core.default_plugins.metrics`) that says how
it wants the model's answers:

* ``candidates``: the answer is chosen among every answer the question has
  in the run (``left``/``right``, ``male``/``female``, diagnoses). Each
  candidate is put in place of the reference and scored with one
  teacher-forced pass: its summed log-probability, softmax over the
  candidates, gives the probability of each class (AUROC) and the most
  probable one is the answer. No sampling. The reference is one of the
  candidates, so its row also gives the sample's loss: a categorical sample
  costs as many rows as it has candidates, not one more.
* ``generate``: greedy decoding (numbers, free text), batched with left
  padding (:func:`umbrella_core.inference.generate.greedy_generate_batch`).

Whatever the scoring, every sample also gets its greedy answer, decoded as
``umbrella generate`` prints it (the same stop tokens, decoding and
stripping), within the question's token budget (:meth:`_Items._limit`): a
categorical question is then scored by its free answer too
(``generated_accuracy``), and every question's metrics say how many answers
ended within the budget and parsed (``ended``, ``parsed``; I13: a model that
ranks the right candidate first but never ends its turn must not look
finished). A question where many did not end gets a ``flag`` line.

Samples whose question no family takes (none does with the built-ins, whose
``text`` family takes anything) get their loss only.

Images are loaded once per sample (in DataLoader workers) and reused by all
its rows.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, cast

import attrs

from umbrella_core.constants import IGNORE_INDEX
from umbrella_core.errors import DataError
from umbrella_core.types import (
    IMAGE_PLACEHOLDER,
    MetricFamily,
    QuestionAnswers,
    StudyRecord,
    Turn,
)
from umbrella_core.types.batch import batch_to

__all__ = [
    "Question",
    "Evaluation",
    "question_and_answer",
    "index_questions",
    "spread_indices",
    "evaluate_dataset",
    "not_ending_flag",
    "NOT_ENDED_FLAG",
]

#: A question is flagged when at least this share of its generated answers did not end.
NOT_ENDED_FLAG = 0.1


def question_and_answer(record: StudyRecord) -> tuple[str, str]:
    """The last user turn before the last answer (placeholders removed) and that answer."""
    question, answer = "", ""
    for turn in record.turns:
        if turn.role == "user":
            question = turn.content.replace(IMAGE_PLACEHOLDER, "").strip()
        else:
            answer = turn.content.strip()
    return question, answer


@attrs.frozen
class Question:
    """A question of the run and how it is scored."""

    text: str
    family: MetricFamily
    #: Every distinct answer over the run's records, sorted: the candidates.
    classes: tuple[str, ...]
    #: The training records' answers (for majority class and training mean).
    train_answers: tuple[str, ...]
    #: The longest answer over the run's records: how long a decoded answer may be.
    longest: str = ""


def index_questions(
    records: Iterable[StudyRecord], families: Sequence[MetricFamily]
) -> dict[str, Question]:
    """Each question of ``records`` (every split: a small held-out set must not make a
    closed question look open) with the first family that takes it."""
    answers: dict[str, list[str]] = {}
    train: dict[str, list[str]] = {}
    for record in records:
        question, answer = question_and_answer(record)
        answers.setdefault(question, []).append(answer)
        if record.split == "train":
            train.setdefault(question, []).append(answer)
    out: dict[str, Question] = {}
    for question, given in answers.items():
        family = next((f for f in families if f.applies(question, given)), None)
        if family is None:
            continue
        out[question] = Question(
            text=question,
            family=family,
            classes=tuple(sorted(set(given))) if family.scoring == "candidates" else (),
            train_answers=tuple(train.get(question, ())),
            longest=max(given, key=len),
        )
    return out


def spread_indices(n: int, limit: int) -> list[int]:
    """``limit`` indices evenly spread over ``range(n)`` (all of them when ``limit`` is 0).

    Held-out sets are ordered by study and modality: a prefix would leave
    whole modalities out, an even spread keeps their proportions.
    """
    if limit <= 0 or limit >= n:
        return list(range(n))
    return sorted({math.floor(i * n / limit) for i in range(limit)})


@attrs.define
class Evaluation:
    """What :func:`evaluate_dataset` found.

    Attributes:
        results: Per modality key: ``n``, ``loss`` (mean per-sample NLL of the
            answer tokens), ``accuracy`` (share of the ``scored`` samples whose
            chosen candidate is the reference; None when none was scored),
            ``generated_accuracy`` (share of the same samples whose generated
            answer ended and is the reference), ``scored``, ``exact`` (share
            of all samples whose greedy answer is the reference, token for
            token, from the teacher-forced pass) and ``questions``: per
            question, its ``family``, ``n``, ``metrics`` (the family's, with
            ``ended``/``n_ended`` and ``parsed``/``n_parsed`` always there),
            ``max_new_tokens`` (its answers' token budget) and ``flag`` (a
            line saying that its answers did not end, or None).
        answers: The answers per (modality key, question), as the families scored them.
        families: The family of each entry of ``answers``.
        samples: One entry per sample: source, key, question, reference,
            answer, the candidates' probabilities where scored so, and where
            its question has a family the ``generated`` answer, whether it
            ``ended`` and its ``max_new_tokens``.
    """

    results: dict[str, dict[str, Any]]
    answers: list[QuestionAnswers] = attrs.field(factory=list)
    families: list[MetricFamily] = attrs.field(factory=list)
    samples: list[dict[str, Any]] = attrs.field(factory=list)
    #: The simple baseline's answers per (modality key, question), where one
    #: was fitted (:mod:`umbrella_core.evaluation.baselines`).
    baselines: dict[tuple[str, str], QuestionAnswers] = attrs.field(factory=dict)


class _Items:
    """Dataset items with what their rows need: images once, the candidates' encodings,
    the prompt to decode from."""

    def __init__(self, dataset: Any, indices: Sequence[int], questions: Mapping[str, Question]):
        self.dataset = dataset
        self.indices = list(indices)
        self.questions = questions
        self.limits: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        dataset = self.dataset
        record_index, window = dataset.items[self.indices[i]]
        record = dataset.records[record_index]
        question, answer = question_and_answer(record)
        asked = self.questions.get(question)
        item: dict[str, Any] = {
            "images": dataset.images(record, window),
            "key": record.modality_key,
            "source": record.source,
            "question": question,
            "reference": answer,
            "rows": [],
            "prompt": None,
            "scoring": asked.family.scoring if asked is not None else None,
        }
        if asked is not None and asked.family.scoring == "candidates":
            for candidate in asked.classes:
                try:
                    encoded = dataset.encode(_answered(record, candidate))
                except DataError:
                    # Longer than max_length with this answer: it cannot be the answer.
                    item["rows"].append((candidate, None))
                    continue
                item["rows"].append((candidate, (encoded.input_ids, encoded.labels)))
        if not any(c == answer and e is not None for c, e in item["rows"]):
            encoded = dataset.encode(record)
            item["rows"].append((None, (encoded.input_ids, encoded.labels)))
        if asked is not None:
            # Every question's answer is generated too, candidates or not (I13).
            item["prompt"] = dataset.encode(record, add_generation_prompt=True).input_ids
            item["limit"] = self._limit(asked)
        return item

    def _limit(self, asked: Question) -> int:
        """Tokens worth decoding for an answer: twice the longest answer the question has
        in the run, at least 8 more (a number needs a few; an untrained model never stops)."""
        if asked.text not in self.limits:
            tokenizer = self.dataset.tokenization.tokenizer
            n = len(tokenizer(asked.longest, add_special_tokens=False)["input_ids"]) + 1
            self.limits[asked.text] = max(2 * n, n + 8)
        return self.limits[asked.text]


def _answered(record: StudyRecord, answer: str) -> StudyRecord:
    """``record`` with its last answer replaced by ``answer``."""
    turns = list(record.turns)
    last = max(i for i, t in enumerate(turns) if t.role == "assistant")
    turns[last] = Turn(role="assistant", content=answer)
    return attrs.evolve(record, turns=turns)


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def evaluate_dataset(
    model: Any,
    dataset: Any,
    collator: Any,
    questions: Mapping[str, Question],
    *,
    batch_size: int = 16,
    workers: int = 0,
    max_samples: int = 0,
    max_new_tokens: int = 128,
    progress: bool = False,
    description: str = "evaluating",
) -> Evaluation:
    """Score the items of a :class:`RecordDataset` (or ``max_samples`` of them, evenly spread).

    Every rank of a distributed run calls this with the same arguments and runs
    the same forward passes in the same order (DeepSpeed ZeRO-3 gathers
    parameters collectively): decoding then runs all the steps of each batch's
    budget rather than stopping when every row has finished on this rank. Every
    question's answer is decoded, categorical ones too (within the question's
    budget, at most ``max_new_tokens``), so the passes are the same on every
    rank: they follow from the items and the run's answers alone.
    """
    import torch
    from torch.utils.data import DataLoader, Dataset

    from umbrella_core.inference.generate import decode, greedy_generate_batch

    tokenizer = dataset.tokenization.tokenizer
    # The stop tokens of the format the prompts are encoded with: what `umbrella
    # generate` stops at (eos and end-of-turn).
    stops = {int(token) for token in dataset.tokenization.chat.stop_token_ids}
    indices = spread_indices(len(dataset), max_samples)
    items = _Items(dataset, indices, questions)
    # _Items is a map-style dataset by its methods, not by subclassing.
    loader: DataLoader[Any] = DataLoader(
        cast("Dataset[Any]", items),
        # Items per chunk; their rows (one per candidate) go in batches of batch_size.
        batch_size=batch_size,
        shuffle=False,
        collate_fn=list,
        num_workers=workers,
    )
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    synced = _distributed()
    samples: list[dict[str, Any]] = []
    try:
        from tqdm.auto import tqdm

        with torch.no_grad():
            for chunk in tqdm(loader, desc=description, disable=not progress, leave=False):
                samples.extend(
                    _score_chunk(
                        model,
                        chunk,
                        collator,
                        batch_size=batch_size,
                        device=device,
                        tokenizer=tokenizer,
                        stops=stops,
                        max_new_tokens=max_new_tokens,
                        synced=synced,
                        decode=decode,
                        generate=greedy_generate_batch,
                    )
                )
    finally:
        model.train(was_training)
    return _summarise(samples, questions)


def _score_chunk(
    model: Any,
    chunk: list[dict[str, Any]],
    collator: Any,
    *,
    batch_size: int,
    device: Any,
    tokenizer: Any,
    stops: set[int],
    max_new_tokens: int,
    synced: bool,
    decode: Any,
    generate: Any,
) -> list[dict[str, Any]]:
    """The samples of ``chunk``: teacher-forced rows in batches of ``batch_size``, then
    the generated answers."""
    scores = _teacher_forced(model, chunk, collator, batch_size=batch_size, device=device)
    samples = [_sample(n, item, scores) for n, item in enumerate(chunk)]
    wanting = [n for n, item in enumerate(chunk) if item["prompt"] is not None]
    budgets = {n: min(max_new_tokens, chunk[n]["limit"]) for n in wanting}
    # Rows of like budgets together: a short categorical answer is not decoded for as
    # long as a report. The order is the same on every rank: the items are.
    wanting.sort(key=budgets.__getitem__)
    for start in range(0, len(wanting), batch_size):
        part = wanting[start : start + batch_size]
        generated = generate(
            model,
            [chunk[n]["prompt"] for n in part],
            [chunk[n]["images"] for n in part],
            max_new_tokens=max(budgets[n] for n in part),
            pad_token_id=tokenizer.pad_token_id,
            stop_token_ids=stops,
            all_steps=synced,
        )
        for n, ids in zip(part, generated, strict=True):
            # Greedy decoding is deterministic, so a row decoded for longer than its
            # budget holds, cut there, what its own budget gives.
            ids = ids[: budgets[n]]
            text = decode(tokenizer, ids)
            samples[n]["generated"] = text
            samples[n]["ended"] = bool(ids) and ids[-1] in stops
            samples[n]["max_new_tokens"] = budgets[n]
            if chunk[n]["scoring"] == "generate":
                samples[n]["answer"] = text
    return samples


def _teacher_forced(
    model: Any, chunk: list[dict[str, Any]], collator: Any, *, batch_size: int, device: Any
) -> dict[tuple[int, str | None], tuple[float, float, bool]]:
    """Per (item, candidate) row: its summed NLL, mean NLL and whether greedy reproduces it."""
    rows = [
        (n, candidate, encoded)
        for n, item in enumerate(chunk)
        for candidate, encoded in item["rows"]
        if encoded is not None
    ]
    scores: dict[tuple[int, str | None], tuple[float, float, bool]] = {}
    for start in range(0, len(rows), batch_size):
        part = rows[start : start + batch_size]
        batch = collator(
            [
                {
                    "input_ids": ids,
                    "labels": labels,
                    "images": chunk[n]["images"],
                    "key": chunk[n]["key"],
                    "source": chunk[n]["source"],
                }
                for n, _, (ids, labels) in part
            ]
        )
        batch = batch_to(batch, device)
        out = model(**batch, return_logits=False, return_correct=True)
        learned = batch["labels"][:, 1:] != IGNORE_INDEX
        summed = out.token_loss.float().sum(1)
        counts = learned.sum(1).clamp(min=1)
        exact = (out.token_correct | ~learned).all(dim=1)
        for (n, candidate, _), s, c, e in zip(
            part, summed.tolist(), counts.tolist(), exact.tolist(), strict=True
        ):
            scores[(n, candidate)] = (s, s / c, bool(e))
    return scores


def _sample(
    n: int, item: dict[str, Any], scores: dict[tuple[int, str | None], tuple[float, float, bool]]
) -> dict[str, Any]:
    """Item ``n``'s sample: its loss and, where scored by candidates, their probabilities."""
    reference = item["reference"]
    own = scores.get((n, reference)) or scores[(n, None)]
    sample: dict[str, Any] = {
        "source": item["source"],
        "key": item["key"],
        "question": item["question"],
        "reference": reference,
        "loss": own[1],
        "exact": own[2],
    }
    candidates = [c for c, _ in item["rows"] if c is not None]
    if candidates:
        logp = [-scores[(n, c)][0] if (n, c) in scores else -math.inf for c in candidates]
        top = max(logp)
        weights = [math.exp(v - top) for v in logp]
        total = sum(weights)
        sample["probabilities"] = [w / total for w in weights]
        sample["answer"] = candidates[max(range(len(logp)), key=logp.__getitem__)]
    return sample


def not_ending_flag(n: int, n_ended: int, max_new_tokens: int | None) -> str | None:
    """The line that says a question's generated answers did not end, or None.

    Raised when at least :data:`NOT_ENDED_FLAG` of the ``n`` answers did not
    end; the table's ``ended`` row shows any smaller share.
    """
    missing = n - n_ended
    if not n or missing <= 0 or missing < NOT_ENDED_FLAG * n:
        return None
    within = f" within {max_new_tokens} tokens" if max_new_tokens else ""
    said = f"{missing} of {n} generated answers did not end{within}"
    if 2 * missing > n:
        said += (
            ": the model does not end its turn (a model composed from a language model "
            "needs its second stage: see README)"
        )
    return said


def _summarise(samples: list[dict[str, Any]], questions: Mapping[str, Question]) -> Evaluation:
    per_key: dict[str, dict[str, Any]] = {}
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for s in samples:
        r = per_key.setdefault(
            s["key"], {"n": 0, "loss": 0.0, "correct": 0, "said": 0, "scored": 0, "exact": 0}
        )
        r["n"] += 1
        r["loss"] += s["loss"]
        r["exact"] += int(s["exact"])
        if "probabilities" in s:
            r["scored"] += 1
            r["correct"] += int(s["answer"] == s["reference"])
            r["said"] += int(s.get("ended", False) and s["generated"] == s["reference"])
        if s["question"] in questions:
            groups.setdefault((s["key"], s["question"]), []).append(s)
    results: dict[str, dict[str, Any]] = {}
    for key in sorted(per_key):
        r = per_key[key]
        results[key] = {
            "n": r["n"],
            "loss": r["loss"] / r["n"],
            "accuracy": r["correct"] / r["scored"] if r["scored"] else None,
            "generated_accuracy": r["said"] / r["scored"] if r["scored"] else None,
            "scored": r["scored"],
            "exact": r["exact"] / r["n"],
            "questions": {},
        }
    answers: list[QuestionAnswers] = []
    families: list[MetricFamily] = []
    for (key, text), group in sorted(groups.items()):
        asked = questions[text]
        scored = QuestionAnswers(
            question=text,
            modality_key=key,
            references=[s["reference"] for s in group],
            predictions=[s.get("answer", "") for s in group],
            classes=asked.classes,
            probabilities=(
                tuple(tuple(s["probabilities"]) for s in group)
                if asked.family.scoring == "candidates"
                else None
            ),
            train_references=asked.train_answers,
            sources=[s["source"] for s in group],
            generated=[s.get("generated", "") for s in group],
            ended=[s.get("ended", False) for s in group],
        )
        metrics = _with_health(dict(asked.family.compute(scored)), scored, asked.family)
        budget = max((s.get("max_new_tokens", 0) for s in group), default=0) or None
        results[key]["questions"][text] = {
            "family": asked.family.name,
            "n": len(group),
            "metrics": metrics,
            "max_new_tokens": budget,
            "flag": not_ending_flag(len(group), metrics["n_ended"], budget),
        }
        answers.append(scored)
        families.append(asked.family)
    return Evaluation(results=results, answers=answers, families=families, samples=samples)


def _with_health(
    metrics: dict[str, Any], answers: QuestionAnswers, family: MetricFamily
) -> dict[str, Any]:
    """``metrics`` with the generated answers' ``ended`` (always the engine's: a family
    cannot hide a model that does not end) and ``parsed`` (the family's where it says;
    else exactly a class for ``candidates`` scoring, ended and not empty for ``generate``)."""
    from umbrella_core.evaluation.metrics import answer_health

    rule = "categorical" if family.scoring == "candidates" else "text"
    health = answer_health(answers.generated, answers.ended, rule=rule, classes=answers.classes)
    metrics["ended"], metrics["n_ended"] = health["ended"], health["n_ended"]
    if "parsed" not in metrics:
        metrics["parsed"], metrics["n_parsed"] = health["parsed"], health["n_parsed"]
    return metrics
