"""What a training run is made of before its first step, and the summary it prints of it.

:func:`~umbrella_core.train.run.prepare` builds a :class:`Prepared`.
"""

from __future__ import annotations

from typing import Any

import attrs

from umbrella_core.config import RunConfig, learning_rate
from umbrella_core.data.assemble import RunData
from umbrella_core.data.conversation import Tokenization
from umbrella_core.data.dataset import RecordDataset
from umbrella_core.model.start import Started
from umbrella_core.types import ModalitySpec

__all__ = ["Prepared", "summary"]


@attrs.frozen
class Prepared:
    """Everything a training run is made of, before the first step: its data and its model."""

    config: RunConfig
    data: RunData
    started: Started

    def datasets(self) -> list[RecordDataset]:
        """Every dataset of the run, each once (the held-out sets may be one)."""
        found = {id(ds): ds for ds in (*self.train_sets, self.eval_set, self.test_set) if ds}
        return list(found.values())

    @property
    def specs(self) -> dict[str, ModalitySpec]:
        return self.data.studies.specs

    @property
    def provenance(self) -> dict[str, tuple[str, str, str]]:
        return self.data.studies.provenance

    @property
    def studies(self) -> list[str]:
        return self.data.studies.locations

    @property
    def skipped(self) -> dict[str, int]:
        return self.data.studies.skipped

    @property
    def train_sets(self) -> list[RecordDataset]:
        return self.data.train_sets

    @property
    def weights(self) -> list[float]:
        return self.data.weights

    @property
    def eval_set(self) -> RecordDataset | None:
        return self.data.eval_set

    @property
    def test_set(self) -> RecordDataset | None:
        return self.data.test_set

    @property
    def problems(self) -> list[Any]:
        return self.data.problems

    @property
    def augment(self) -> dict[str, Any]:
        return self.data.augment

    @property
    def tokenization(self) -> Tokenization:
        return self.data.tokenization

    @property
    def model(self) -> Any:
        return self.started.model

    @property
    def tokenizer(self) -> Any:
        return self.started.tokenizer

    @property
    def trainable(self) -> str:
        return self.started.trainable

    @property
    def base_is_random(self) -> bool:
        return self.started.base_is_random


def _chat_line(prep: Prepared) -> str:
    """Which template conversations are written with, and where an answer ends."""
    chat = prep.tokenization.chat
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
    if prep.started.reason:
        lines.append(f"               ({prep.started.reason})")
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
    if prep.config.trainer.eval_strategy == "no" and prep.eval_set is not None:
        held = sum(len(ds) for ds in prep.datasets() if ds is prep.eval_set or ds is prep.test_set)
        lines.append(
            f"    {'(held out)':<24} {held} samples, not evaluated (trainer.eval_strategy=no; "
            "umbrella evaluate scores final/ on them)"
        )
    elif prep.test_set is not None and prep.test_set is not prep.eval_set:
        assert prep.eval_set is not None  # held_out_sets: a test set comes with an eval set
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
