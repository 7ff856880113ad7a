"""Per-(study, modality) datasets of records, loading images through their modality plugin."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from umbrella_core.data.conversation import Tokenization
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
    :attr:`ModalitySpec.windowed`); without a cache it is read alone when the
    modality can (``Windows.window``), else cut from the whole series.
    """
    import numpy as np
    import torch

    if window is not None and spec.windowed:
        assert spec.windows is not None  # windowed
        if cache is not None:
            array = cache.window(spec, tuple(paths), window)
        elif spec.windows.window is not None:
            array = spec.windows.window(spec, tuple(paths), window)
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

    Args:
        records: Its records.
        specs: The run's modality specs (how each image is loaded).
        tokenization: How a record becomes tokens (:class:`Tokenization`).
        name: Shown in logs and tables (``demo/t1``, ``test``).
        key: The interleaving key: samples of one key may share a batch under
            ``data.batching: modality|length`` (the records' modality key for a
            training set); default ``name``.
        cache: The preprocessed cache, or None.
        frames: ``frames(spec, paths)``: a series' frames (a HeaderIndex's, since
            0.3, so a relaunch reads no fMRI header for them).
        record_lengths: Each record's encoded length, where the caller already
            encoded them (screening does), so that :attr:`lengths` needs no
            second pass over the conversations (since 0.3).
    """

    def __init__(
        self,
        records: Sequence[StudyRecord],
        specs: Mapping[str, ModalitySpec],
        tokenization: Tokenization,
        *,
        name: str = "",
        key: str | None = None,
        cache: Any = None,
        frames: Any = None,
        record_lengths: Sequence[int] | None = None,
    ) -> None:
        self.records: Sequence[StudyRecord] = list(records)
        self.specs = dict(specs)
        self.tokenization = tokenization
        self.name = name
        self.key = key if key is not None else name
        self.cache = cache
        # ``frames`` is not kept: workers started by spawn would get the whole
        # index pickled.
        self.items: Sequence[tuple[int, int | None]] = self._windows(frames or None)
        if record_lengths is not None and len(record_lengths) != len(self.records):
            raise ValueError(
                f"record_lengths: {len(record_lengths)} lengths for {len(self.records)} records"
            )
        self._record_lengths = record_lengths
        self._lengths: Any = None

    def _windows(self, frames_of: Any = None) -> list[tuple[int, int | None]]:
        """(record, window) per sample: a record whose images include a windowed
        modality gives one sample per window (the fewest over its windowed
        images); other records give one sample."""
        items: list[tuple[int, int | None]] = []
        for index, record in enumerate(self.records):
            counts = []
            for image in record.images:
                spec = self.specs.get(image.modality)
                if spec is not None and spec.windowed:
                    assert spec.windows is not None  # windowed
                    frames = (frames_of or spec.windows.frames)(spec, tuple(image.paths))
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

    @property
    def lengths(self) -> Any:
        """Each sample's length in tokens (text and image tokens), as an int64 array.

        The length of :meth:`__getitem__`'s ``input_ids``, known without
        loading an image: ``record_lengths`` when the dataset was given them (a
        record's windows share its length), else counted once, on first use
        (:func:`~umbrella_core.data.lengths.conversation_lengths`: exact for
        most templates, a few tokens short for some). Read it before
        :meth:`pack`: counting then decodes every record. Since 0.3.
        """
        if self._lengths is None:
            import numpy as np

            per_record: Sequence[int] | np.ndarray | None = self._record_lengths
            if per_record is None:
                from umbrella_core.data.lengths import conversation_lengths

                per_record = conversation_lengths(self.records, self.tokenization)
            owners = np.fromiter((r for r, _ in self.items), dtype=np.int64, count=len(self.items))
            self._lengths = np.asarray(per_record, dtype=np.int64)[owners]
        return self._lengths

    def pack(self) -> None:
        """Hold the records and items in arrays (:mod:`umbrella_core.data.packed`).

        :attr:`records` becomes a :class:`~umbrella_core.data.packed.PackedRecords`
        (each record decoded when read) and the records' Python objects are
        let go. Call it before DataLoader workers are started by fork: they
        then read records without copying their pages. Since 0.3.
        """
        from umbrella_core.data.packed import PackedItems, PackedRecords

        if not isinstance(self.records, PackedRecords):
            self.records = PackedRecords(self.records)
            self.items = PackedItems(self.items)

    def record(self, index: int) -> StudyRecord:
        """Record ``index`` (decoded from its bytes once :meth:`pack` ran)."""
        return self.records[index]

    def encode(self, record: StudyRecord, *, add_generation_prompt: bool = False) -> Any:
        """``record``'s token ids and labels (:meth:`Tokenization.encode`)."""
        return self.tokenization.encode(record, add_generation_prompt=add_generation_prompt)

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
        record = self.record(record_index)
        encoded = self.encode(record)
        try:
            images = self.images(record, window)
        except DataError as error:
            # Found only when decoded, mid-run: name the record (its manifest line) and
            # the check that finds such files before step 1.
            where = record.source or f"subject {record.subject}"
            said = str(error) if str(error).startswith(where) else f"{where}: {error}"
            raise DataError(
                f"{said}; data.check=full (or umbrella validate) finds such files before step 1"
            ) from None
        return {
            "input_ids": encoded.input_ids,
            "labels": encoded.labels,
            "images": images,
            "key": record.modality_key,
            "source": record.source,
        }


def group_records(records: Sequence[StudyRecord]) -> dict[tuple[str, str], list[StudyRecord]]:
    """Records grouped by ``(study, modality_key)``, in first-seen order."""
    groups: dict[tuple[str, str], list[StudyRecord]] = {}
    for record in records:
        groups.setdefault((record.study, record.modality_key), []).append(record)
    return groups
