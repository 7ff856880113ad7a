"""The collator: pads text, masks labels, and stacks images per modality.

A batch may mix modalities and samples may hold several images. Images are
grouped by modality name (invariant I2: dispatch by name, never by shape);
``image_modalities`` lists each image's modality in the order its placeholder
tokens appear in the flattened batch, which is how the model puts each
image's features back in its place.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from umbrella_core.data.conversation import IGNORE_INDEX

__all__ = ["UmbrellaCollator"]


class UmbrellaCollator:
    """Collate dataset items into one batch.

    Args:
        pad_token_id: Id used to pad ``input_ids`` (right padding).
        modality_order: Canonical order of modalities; ``pixel_values`` keys follow it.
    """

    def __init__(self, pad_token_id: int, modality_order: Sequence[str]) -> None:
        self.pad_token_id = int(pad_token_id)
        self.modality_order = tuple(modality_order)

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        import torch

        length = max(len(item["input_ids"]) for item in items)
        batch_size = len(items)
        input_ids = torch.full((batch_size, length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch_size, length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((batch_size, length), dtype=torch.long)
        groups: dict[str, list[Any]] = {}
        image_modalities: list[str] = []
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            input_ids[row, :n] = torch.as_tensor(item["input_ids"], dtype=torch.long)
            labels[row, :n] = torch.as_tensor(item["labels"], dtype=torch.long)
            attention_mask[row, :n] = 1
            for modality, tensor in item["images"]:
                groups.setdefault(modality, []).append(tensor)
                image_modalities.append(modality)
        unknown = set(groups) - set(self.modality_order)
        if unknown:
            raise ValueError(f"batch holds modalities {sorted(unknown)} that are not active")
        pixel_values = {m: torch.stack(groups[m]) for m in self.modality_order if m in groups}
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "pixel_values": pixel_values,
            "image_modalities": image_modalities,
            "sample_keys": [item["key"] for item in items],
        }
