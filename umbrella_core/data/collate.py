"""The collator: pads text, masks labels, stacks images per modality, and records
where each image goes.

A batch (:class:`~umbrella_core.types.Batch`) may mix modalities and
samples may hold several images. Images are grouped by modality name
(invariant I2: dispatch by name, never by shape); ``image_places`` records,
for each stacked image, its row and the ordinal of its placeholder in that
row, which is how the model puts each image's features in its own place.
Training, evaluation and generation all collate through :class:`UmbrellaCollator`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from umbrella_core.constants import IGNORE_INDEX
from umbrella_core.types.batch import Batch

__all__ = ["UmbrellaCollator"]

PADDING_SIDES = ("right", "left")


class UmbrellaCollator:
    """Collate dataset items into one :class:`~umbrella_core.types.Batch`.

    An item holds ``input_ids``, ``labels`` (left out for a prompt to generate
    from: nothing is learned), ``images`` (``(modality, tensor)`` in placeholder
    order), ``key`` (its modality key) and ``source`` (where its record was read).

    Args:
        pad_token_id: Id used to pad ``input_ids``.
        modality_order: Canonical order of modalities; ``pixel_values`` keys follow it.
        padding_side: ``right`` (training, scoring) or ``left`` (generation: every
            row's next token is then at the last position).
    """

    def __init__(
        self, pad_token_id: int, modality_order: Sequence[str], padding_side: str = "right"
    ) -> None:
        if padding_side not in PADDING_SIDES:
            raise ValueError(f"padding_side must be right or left, got {padding_side!r}")
        self.pad_token_id = int(pad_token_id)
        self.modality_order = tuple(modality_order)
        self.padding_side = padding_side

    def __call__(self, items: Sequence[dict[str, Any]]) -> Batch:
        import torch

        length = max(len(item["input_ids"]) for item in items)
        batch_size = len(items)
        input_ids = torch.full((batch_size, length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch_size, length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((batch_size, length), dtype=torch.long)
        groups: dict[str, list[Any]] = {}
        places: dict[str, list[tuple[int, int]]] = {}
        image_modalities: list[str] = []
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            span = slice(length - n, length) if self.padding_side == "left" else slice(0, n)
            input_ids[row, span] = torch.as_tensor(item["input_ids"], dtype=torch.long)
            if item.get("labels") is not None:
                labels[row, span] = torch.as_tensor(item["labels"], dtype=torch.long)
            attention_mask[row, span] = 1
            for ordinal, (modality, tensor) in enumerate(item["images"]):
                groups.setdefault(modality, []).append(torch.as_tensor(tensor))
                places.setdefault(modality, []).append((row, ordinal))
                image_modalities.append(modality)
        unknown = set(groups) - set(self.modality_order)
        if unknown:
            raise ValueError(f"batch holds modalities {sorted(unknown)} that are not active")
        present = [m for m in self.modality_order if m in groups]
        return Batch(
            input_ids=input_ids,
            attention_mask=attention_mask,
            labels=labels,
            pixel_values={m: torch.stack(groups[m]) for m in present},
            image_places={m: places[m] for m in present},
            image_modalities=image_modalities,
            sample_keys=[item["key"] for item in items],
            sample_sources=[item.get("source") for item in items],
        )
