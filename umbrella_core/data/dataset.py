"""Per-(study, modality) datasets of records, loading images through their modality plugin."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from umbrella_core.data.conversation import encode_conversation
from umbrella_core.errors import DataError
from umbrella_core.types import ModalitySpec, StudyRecord

__all__ = ["RecordDataset", "load_image", "group_records"]


def load_image(
    spec: ModalitySpec,
    paths: Sequence[str],
    where: str = "",
    cache: Any = None,
    window: int | None = None,
) -> Any:
    """A model-ready float32 tensor ``(channels, *spec.shape)`` from the modality's loader.

    With a :class:`~umbrella_core.data.cache.PreprocessedCache` the array comes
    from the cache when it holds it (no decoding), and is stored there otherwise.
    ``window`` picks a window of a windowed modality's series (see
    :attr:`ModalitySpec.windowed`); without a cache the whole series is
    preprocessed for it, so long series want the cache.
    """
    import numpy as np
    import torch

    if window is not None and spec.windowed:
        if cache is not None:
            array = cache.window(spec, tuple(paths), window)
        else:
            array = np.asarray(spec.windows.series(spec, tuple(paths)))[
                ..., spec.window_slice(window)
            ]
    elif cache is not None:
        array = cache.load(spec, tuple(paths))
    else:
        array = spec.load(spec, tuple(paths))
    array = np.asarray(array, dtype=np.float32)
    if array.shape != spec.input_shape:
        raise DataError(
            f"{', '.join(paths)}: the {spec.name} loader returned shape {array.shape}, "
            f"expected {spec.input_shape}{f' ({where})' if where else ''}"
        )
    if not array.flags.writeable or not array.flags.c_contiguous:
        array = np.array(array, dtype=np.float32, order="C")  # out of the memory map
    return torch.from_numpy(array)


class RecordDataset:
    """A map-style dataset over records of one study and one modality combination.

    Item ``i`` is a dict with ``input_ids``, ``labels`` (lists of int), ``images``
    (list of ``(modality, tensor)`` in placeholder order), ``key`` (the record's
    modality key, for per-modality logging) and ``source``.
    """

    def __init__(
        self,
        records: Sequence[StudyRecord],
        specs: Mapping[str, ModalitySpec],
        *,
        tokenizer: Any,
        image_token_id: int,
        max_length: int,
        name: str = "",
        cache: Any = None,
        chat: Any = None,
    ) -> None:
        self.records = list(records)
        self.specs = dict(specs)
        self.tokenizer = tokenizer
        self.image_token_id = image_token_id
        self.max_length = max_length
        self.name = name
        self.cache = cache
        # The language model's conversation format (a ChatFormat); None: the
        # tokenizer's own chat template, else LLaVA-1.5.
        self.chat = chat
        self.tokens_per_modality = {n: s.num_tokens for n, s in self.specs.items()}
        self.items = self._windows()

    def _windows(self) -> list[tuple[int, int | None]]:
        """(record, window) per sample: a record whose images include a windowed
        modality gives one sample per window (the fewest over its windowed
        images); other records give one sample."""
        items: list[tuple[int, int | None]] = []
        for index, record in enumerate(self.records):
            counts = []
            for image in record.images:
                spec = self.specs.get(image.modality)
                if spec is not None and spec.windowed:
                    frames = spec.windows.frames(spec, tuple(image.paths))
                    count = spec.window_count(frames)
                    if count == 0:
                        raise DataError(
                            f"{', '.join(image.paths)}: {frames} frames, fewer than the "
                            f"{spec.shape[-1]} of one {spec.name} window ({record.source})"
                        )
                    counts.append(count)
            if counts:
                items.extend((index, w) for w in range(min(counts)))
            else:
                items.append((index, None))
        return items

    def __len__(self) -> int:
        return len(self.items)

    def encode(self, record: StudyRecord, *, add_generation_prompt: bool = False) -> Any:
        return encode_conversation(
            record.turns,
            record.modalities,
            tokenizer=self.tokenizer,
            image_token_id=self.image_token_id,
            tokens_per_modality=self.tokens_per_modality,
            max_length=self.max_length,
            add_generation_prompt=add_generation_prompt,
            where=record.source or f"subject {record.subject}",
            chat=self.chat,
        )

    def images(self, record: StudyRecord, window: int | None = None) -> list[tuple[str, Any]]:
        return [
            (
                image.modality,
                load_image(
                    self.specs[image.modality], image.paths, record.source, self.cache, window
                ),
            )
            for image in record.images
        ]

    def __getitem__(self, index: int) -> dict[str, Any]:
        record_index, window = self.items[index]
        record = self.records[record_index]
        encoded = self.encode(record)
        return {
            "input_ids": encoded.input_ids,
            "labels": encoded.labels,
            "images": self.images(record, window),
            "key": record.modality_key,
            "source": record.source,
        }


def group_records(records: Sequence[StudyRecord]) -> dict[str, list[StudyRecord]]:
    """Records grouped by ``study/modality_key``, in first-seen order."""
    groups: dict[str, list[StudyRecord]] = {}
    for record in records:
        groups.setdefault(f"{record.study}/{record.modality_key}", []).append(record)
    return groups
