"""Held-out evaluation: loss per modality, and does the greedy answer equal the reference?

With teacher forcing, greedy decoding reproduces the reference answer exactly
when, at every answer position (the end-of-sequence token included), the most
likely next token is the reference token. One forward pass per batch therefore
gives exact-match accuracy of greedy generation, without a decode loop
(:func:`umbrella_core.train.generate.greedy_generate` is the decode loop, and
agrees with it).

Exact match only means something for closed-form questions (``left`` or
``right``, a sex, a diagnosis), not for free text or numbers that are rarely
repeated exactly (``63 years``). A question is closed-form when its answers
over the run's records take few distinct values, each seen more than once on
average (:func:`closed_form_questions`); accuracy is reported over the samples
that ask one, and the loss over all samples.

Used three ways: during training (:func:`evaluate_trainer`, behind
``UmbrellaTrainer.evaluate``), after training (the table ``umbrella train``
prints) and on a saved checkpoint (``umbrella evaluate``,
:func:`evaluate_checkpoint`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any

import torch

from umbrella_core.data.collate import UmbrellaCollator
from umbrella_core.data.conversation import IGNORE_INDEX
from umbrella_core.types import IMAGE_PLACEHOLDER, StudyRecord

__all__ = [
    "answer_accuracy",
    "closed_form_questions",
    "question_and_answer",
    "item_records",
    "summarize",
    "evaluate_trainer",
    "evaluate_checkpoint",
    "format_table",
    "CLOSED_FORM_MAX_ANSWERS",
]

#: A question with more distinct answers than this is free-form.
CLOSED_FORM_MAX_ANSWERS = 10


def question_and_answer(record: StudyRecord) -> tuple[str, str]:
    """The last user turn before the last answer (placeholders removed) and that answer."""
    question, answer = "", ""
    for turn in record.turns:
        if turn.role == "user":
            question = turn.content.replace(IMAGE_PLACEHOLDER, "").strip()
        else:
            answer = turn.content.strip()
    return question, answer


def closed_form_questions(
    records: Iterable[StudyRecord], max_answers: int = CLOSED_FORM_MAX_ANSWERS
) -> set[str]:
    """Questions whose answers take at most ``max_answers`` values, each seen twice on average.

    Pass every record of the run (training and held-out), so that a small
    held-out split does not make a closed question look open.
    """
    answers: dict[str, list[str]] = {}
    for record in records:
        question, answer = question_and_answer(record)
        answers.setdefault(question, []).append(answer)
    return {
        q
        for q, given in answers.items()
        if len(set(given)) <= max_answers and 2 * len(set(given)) <= len(given)
    }


def item_records(dataset: Any) -> list[StudyRecord]:
    """The record of each item of a :class:`RecordDataset` or a ``ConcatDataset`` of them.

    Other datasets give an empty list (their items are not known as records).
    """
    if hasattr(dataset, "datasets"):  # torch ConcatDataset
        out: list[StudyRecord] = []
        for part in dataset.datasets:
            out.extend(item_records(part))
        return out
    if hasattr(dataset, "records") and hasattr(dataset, "items"):
        return [dataset.records[index] for index, _ in dataset.items]
    return []


def _to_device(batch: dict[str, Any], device: Any) -> dict[str, Any]:
    return {
        k: (
            v.to(device)
            if isinstance(v, torch.Tensor)
            else {m: t.to(device) for m, t in v.items()}
            if isinstance(v, dict)
            else v
        )
        for k, v in batch.items()
    }


@torch.no_grad()
def answer_accuracy(
    model: Any,
    dataset: Any,
    collator: UmbrellaCollator,
    *,
    batch_size: int = 16,
    questions: Collection[str] | None = None,
    workers: int = 0,
) -> dict[str, dict[str, Any]]:
    """Per modality key: ``{"n", "loss", "accuracy", "scored"}`` over every item of ``dataset``.

    ``loss`` is the mean per-sample NLL of the answer tokens. ``accuracy`` is
    the share of exact greedy answers among the ``scored`` samples: all of
    them, or with ``questions`` only those asking one of these (closed-form)
    questions; None when no sample of the key is scored.
    """
    from torch.utils.data import DataLoader

    was_training = model.training
    model.eval()
    records = item_records(dataset) if questions is not None else []
    scored_items = (
        [question_and_answer(r)[0] in questions for r in records]
        if questions is not None and len(records) == len(dataset)
        else None
    )
    # Per key: correct, scored, loss sum, n.
    stats: dict[str, list[float]] = {}
    device = next(model.parameters()).device
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=False, collate_fn=collator, num_workers=workers
    )
    row = 0
    try:
        for batch in loader:
            batch = _to_device(batch, device)
            # Per-position NLL and argmax hits at the answer tokens only: full
            # logits would be B x L x vocab (GBs with a 262k-token vocabulary).
            out = model(**batch, return_logits=False, return_correct=True)
            learned = batch["labels"][:, 1:] != IGNORE_INDEX
            correct = (out.token_correct | ~learned).all(dim=1)
            per_row = out.token_loss.sum(1) / learned.sum(1).clamp(min=1)
            for key, ok, loss in zip(
                batch["sample_keys"], correct.tolist(), per_row.tolist(), strict=True
            ):
                scored = scored_items[row] if scored_items is not None else True
                s = stats.setdefault(key, [0.0, 0.0, 0.0, 0.0])
                s[0] += float(ok and scored)
                s[1] += float(scored)
                s[2] += loss
                s[3] += 1
                row += 1
    finally:
        model.train(was_training)
    return {
        k: {
            "n": int(s[3]),
            "loss": s[2] / s[3],
            "accuracy": s[0] / s[1] if s[1] else None,
            "scored": int(s[1]),
        }
        for k, s in sorted(stats.items())
    }


def summarize(results: dict[str, dict[str, Any]], prefix: str = "eval") -> dict[str, float]:
    """Flat metrics: ``{prefix}_loss`` and ``{prefix}_accuracy`` over all samples, and per key
    ``{prefix}_loss/<key>``, ``{prefix}_accuracy/<key>`` (accuracy only where scored)."""
    metrics: dict[str, float] = {}
    n = sum(r["n"] for r in results.values())
    scored = sum(r["scored"] for r in results.values())
    if n:
        metrics[f"{prefix}_loss"] = sum(r["loss"] * r["n"] for r in results.values()) / n
    if scored:
        metrics[f"{prefix}_accuracy"] = (
            sum(r["accuracy"] * r["scored"] for r in results.values() if r["scored"]) / scored
        )
    for key, r in results.items():
        metrics[f"{prefix}_loss/{key}"] = r["loss"]
        if r["accuracy"] is not None:
            metrics[f"{prefix}_accuracy/{key}"] = r["accuracy"]
    return metrics


def run_questions(*datasets: Any) -> set[str]:
    """The closed-form questions among the records of ``datasets`` (None entries skipped)."""
    records: list[StudyRecord] = []
    for dataset in datasets:
        if dataset is not None:
            records.extend(item_records(dataset))
    return closed_form_questions(records)


def evaluate_trainer(
    trainer: Any, eval_dataset: Any = None, *, metric_key_prefix: str = "eval"
) -> dict[str, float]:
    """``UmbrellaTrainer.evaluate``: per-modality held-out loss and answer accuracy.

    Every rank evaluates the whole held-out set (the same forward passes in the
    same order, as DeepSpeed ZeRO-3 needs); the metrics go to the log history
    and TensorBoard through ``Trainer.log`` (``eval/loss/t1``, ``eval/accuracy``)
    and to the callbacks' ``on_evaluate`` (best checkpoint, early stopping,
    generated samples).
    """
    dataset = eval_dataset if eval_dataset is not None else trainer.eval_dataset
    started = time.perf_counter()
    questions = run_questions(trainer.train_dataset, dataset)
    with trainer.compute_loss_context_manager():
        results = answer_accuracy(
            trainer.model,
            dataset,
            trainer.data_collator,
            batch_size=trainer.args.per_device_eval_batch_size,
            questions=questions,
            workers=trainer.args.dataloader_num_workers,
        )
    metrics = summarize(results, metric_key_prefix)
    metrics[f"{metric_key_prefix}_runtime"] = round(time.perf_counter() - started, 3)
    trainer.log(metrics)
    trainer.control = trainer.callback_handler.on_evaluate(
        trainer.args, trainer.state, trainer.control, metrics=metrics
    )
    return metrics


def evaluate_checkpoint(
    checkpoint: str,
    pm: Any,
    *,
    studies: Sequence[str] = (),
    split: str = "test",
    batch_size: int | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, dict[str, Any]]:
    """``umbrella evaluate``: the per-key results of a checkpoint on a split of its studies.

    Studies are the checkpoint's own (from the run configuration it stores;
    the built-in demo is written again exactly as training wrote it) unless
    ``studies`` names others. ``split`` is ``test``, ``validation``, ``train``
    or ``held-out`` (everything but ``train``).
    """
    import attrs

    from umbrella_core.config import StudyConfig
    from umbrella_core.data.dataset import RecordDataset
    from umbrella_core.errors import DataError, ModelError
    from umbrella_core.model.chat import chat_format
    from umbrella_core.train.generate import load_for_inference
    from umbrella_core.train.run import read_studies

    loaded = load_for_inference(checkpoint, pm)
    config = loaded.config
    if studies:
        config = attrs.evolve(
            config,
            data=attrs.evolve(config.data, studies=tuple(StudyConfig(location=s) for s in studies)),
        )
    data = read_studies(config, pm, log=log)
    for name, spec in data.specs.items():
        have = loaded.specs.get(name)
        if have is None or have.input_shape != spec.input_shape:
            raise ModelError(
                f"{checkpoint}: the checkpoint's {name} input is "
                f"{have.input_shape if have else 'absent'}, its run configuration gives "
                f"{spec.input_shape}"
            )
    wanted = [
        r for r in data.records if (r.split != "train" if split == "held-out" else r.split == split)
    ]
    if not wanted:
        present = sorted({r.split for r in data.records})
        raise DataError(
            f"no record of split {split!r} in {', '.join(data.locations)} "
            f"(splits there: {', '.join(present)})"
        )
    model = loaded.model
    dataset = RecordDataset(
        wanted,
        loaded.specs,
        tokenizer=loaded.tokenizer,
        image_token_id=model.image_token_id,
        max_length=config.model.max_length,
        name=split,
        # The checkpoint's tokenizer carries its chat template: "auto" finds it.
        chat=chat_format(loaded.tokenizer, "auto", config.model.system_prompt),
    )
    collator = UmbrellaCollator(loaded.tokenizer.pad_token_id, tuple(model.specs))
    return answer_accuracy(
        model,
        dataset,
        collator,
        batch_size=batch_size or config.trainer.batch_size,
        questions=closed_form_questions(data.records),
        workers=config.data.workers,
    )


def format_table(results: dict[str, dict[str, Any]], chance: Sequence[float] | None = None) -> str:
    """One line per modality key: ``n``, ``accuracy`` (``-`` where not scored) and ``loss``."""
    lines = [f"{'modality':<14}{'n':>6}{'accuracy':>10}{'loss':>9}"]
    for key, r in results.items():
        accuracy = "-" if r.get("accuracy") is None else f"{r['accuracy']:.1%}"
        lines.append(f"{key:<14}{r['n']:>6}{accuracy:>10}{r['loss']:>9.4f}")
    return "\n".join(lines)
