"""What a training run is made of before its first step, and the summary it prints of it.

Part of :mod:`umbrella_core.train.run`, which builds a :class:`Prepared` in
:func:`~umbrella_core.train.run.prepare` and re-exports this module's names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

from umbrella_core.config import RunConfig, learning_rate
from umbrella_core.data.dataset import RecordDataset
from umbrella_core.types import ModalitySpec, StudyRecord

__all__ = ["Prepared", "held_out_sets", "summary"]


@attrs.define
class Prepared:
    """Everything a training run is made of, before the first step."""

    config: RunConfig
    specs: dict[str, ModalitySpec]
    provenance: dict[str, tuple[str, str, str]]
    model: Any
    tokenizer: Any
    train_sets: list[RecordDataset]
    #: Evaluated during training, picks best/: the validation records (test
    #: records where the studies have no validation split).
    eval_set: RecordDataset | None
    studies: list[str]
    weights: list[float]
    skipped: dict[str, int]
    problems: list[Any]
    trainable: str
    base_is_random: bool
    #: Why ``trainable`` was chosen (``trainable: auto`` explained).
    trainable_reason: str = ""
    #: What the model was built from: tiny | composed | llava | checkpoint.
    start_kind: str = ""
    #: Reported by the table at the end: the test records (the validation
    #: records where there are none; then ``test_set is eval_set``).
    test_set: RecordDataset | None = None
    #: Modality -> its augmentation of training images (umbrella_core.augmentation).
    augment: dict[str, Any] = attrs.field(factory=dict)


def held_out_sets(
    records: list[StudyRecord], dataset: Callable[[list[StudyRecord], str], RecordDataset]
) -> tuple[RecordDataset | None, RecordDataset | None]:
    """``(eval_set, test_set)``: what evaluation during training sees, what the end reports.

    Evaluation during training (and so the choice of ``best/``) uses the
    ``validation`` records and the table at the end the ``test`` ones, so that
    the reported figures are not of the records that chose the weights. Studies
    with only one held-out split use it for both (records of any split but
    ``train`` and ``validation`` count as test), as before there was a choice.
    """
    validation = [r for r in records if r.split == "validation"]
    test = [r for r in records if r.split not in ("train", "validation")]
    if validation and test:
        return dataset(validation, "validation"), dataset(test, "test")
    held_out = validation or test
    if not held_out:
        return None, None
    both = dataset(held_out, "held-out")
    return both, both


def _chat_line(prep: Prepared) -> str:
    """Which template conversations are written with, and where an answer ends."""
    chat = prep.train_sets[0].chat
    if chat is None:
        return "no chat template"
    from umbrella_core.model.chat_templates import TEMPLATE_NAMES

    said = (
        "the tokenizer's own template"
        if chat.name == "tokenizer"
        else f"the built-in {chat.name} template"
        if chat.name in TEMPLATE_NAMES
        else f"the template of {chat.name}"
    )
    stops = ", ".join(prep.tokenizer.convert_ids_to_tokens(list(chat.stop_token_ids)))
    eot = f"turns end with {chat.end_of_turn}" if chat.end_of_turn else "no end-of-turn token"
    return f"{said} ({prep.config.model.chat_template}): {eot}; answers stop at {stops}"


def summary(prep: Prepared) -> str:
    """The start-of-run summary: modalities and plugins, parameters, samples."""
    model = prep.model
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    model_config = prep.config.model
    if model_config.language:
        base = (
            f"  language     {model_config.language} (composed: vision {model_config.vision}, "
            "new projector)"
        )
    else:
        base = f"  base model   {model_config.base}" + (
            " (random weights, built-in)" if prep.base_is_random else ""
        )
    lines = ["UMBRELLA training run", base]
    lines.append(
        f"  trainable    {prep.trainable}: {trainable:,} of {total:,} parameters "
        f"({trainable / total:.1%})"
    )
    if prep.trainable_reason:
        lines.append(f"               ({prep.trainable_reason})")
    lines.append(f"  chat         {_chat_line(prep)}")
    t = prep.config.trainer
    lines.append(
        f"  length       {t.max_steps} steps"
        if t.max_steps
        else f"  length       {t.epochs:g} epoch(s) (trainer.max_steps is 0: epochs decide)"
    )
    rate, source = learning_rate(prep.config)
    lines.append(f"  learning     rate {rate:g} ({source}), cosine schedule")
    lines.append("  modalities")
    counts: dict[str, int] = {}
    for ds in prep.train_sets:
        for record in ds.records:
            for m in set(record.modalities):
                counts[m] = counts.get(m, 0) + 1
    for name, spec in prep.specs.items():
        plugin, dist, version = prep.provenance[name]
        lines.append(
            f"    {name:<8} {dist} {version}  shape {'x'.join(map(str, spec.input_shape))}  "
            f"patch {'x'.join(map(str, spec.patch_size))}  {spec.num_tokens} tokens/image  "
            f"{counts.get(name, 0)} training samples"
        )
    lines.append("  studies")
    total_weight = sum(prep.weights)
    for ds, weight in zip(prep.train_sets, prep.weights, strict=True):
        lines.append(f"    {ds.name:<24} {len(ds)} samples, {weight / total_weight:.0%} of draws")
    if prep.test_set is not None and prep.test_set is not prep.eval_set:
        lines.append(f"    {'(validation)':<24} {len(prep.eval_set)} samples: evaluation, best/")
        lines.append(f"    {'(test)':<24} {len(prep.test_set)} samples: the table at the end")
    elif prep.eval_set is not None:
        lines.append(f"    {'(held out)':<24} {len(prep.eval_set)} samples")
    for key, n in sorted(prep.skipped.items()):
        lines.append(f"  skipped {n} record(s) of {key}: modality not active in this run")
    if prep.problems:
        lines.append(
            f"  skipped {len(prep.problems)} bad sample(s), listed in OUTPUT_DIR/bad_samples.json"
        )
    return "\n".join(lines)
