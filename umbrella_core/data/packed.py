"""Records packed into two arrays, for DataLoader workers (since 0.3).

A worker started by fork shares its parent's memory until it writes to it,
and reading a Python object writes to it: its reference count changes, and
the garbage collector marks every object it visits. Over an epoch a worker
thus copies the pages of every record it reads, and a full collection copies
all of them: with 200,000 records, hundreds of MB per worker. Packed, the
records are one byte array and one offset array, which neither touches:
:class:`PackedRecords` decodes record ``i`` from its bytes when asked (~40 µs,
next to milliseconds for its image), and :class:`PackedItems` holds a
dataset's (record, window) pairs the same way. The main process lets the
records' objects go too (:meth:`RecordDataset.pack
<umbrella_core.data.dataset.RecordDataset.pack>`), so the pages its workers
share with it shrink rather than grow with the cohort.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from umbrella_core.types import ImageRef, StudyRecord, Turn

__all__ = ["PackedRecords", "PackedItems", "ready_for_workers"]


def _to_json(record: StudyRecord) -> list[Any]:
    return [
        record.subject,
        [[image.modality, list(image.paths)] for image in record.images],
        [[turn.role, turn.content] for turn in record.turns],
        record.study,
        record.session,
        record.split,
        record.family,
        record.site,
        dict(record.phenotypes),
        record.source,
        record.laterality,
        list(record.forbid_augment),
    ]


def _from_json(data: list[Any]) -> StudyRecord:
    subject, images, turns, study, session, split, family, site, phenotypes, source = data[:10]
    return StudyRecord(
        subject=subject,
        images=[ImageRef(modality=modality, paths=paths) for modality, paths in images],
        turns=[Turn(role=role, content=content) for role, content in turns],
        study=study,
        session=session,
        split=split,
        family=family,
        site=site,
        phenotypes=phenotypes,
        source=source,
        laterality=data[10],
        forbid_augment=data[11],
    )


class PackedRecords(Sequence[StudyRecord]):
    """A read-only sequence of records stored as JSON bytes in one array.

    Phenotype values must be JSON values (numbers, strings, lists, mappings),
    as every reader yields them; a record holding anything else is refused
    with a TypeError naming it when packed.
    """

    def __init__(self, records: Sequence[StudyRecord]) -> None:
        blobs = []
        for record in records:
            try:
                blobs.append(json.dumps(_to_json(record), separators=(",", ":")).encode())
            except TypeError as error:
                raise TypeError(f"{record.source or record.subject}: {error}") from None
        self._offsets = np.zeros(len(blobs) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in blobs], out=self._offsets[1:])
        self._data = np.frombuffer(b"".join(blobs), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, index: int) -> StudyRecord:  # type: ignore[override]
        if not -len(self) <= index < len(self):
            raise IndexError(f"record {index} of {len(self)}")
        index %= len(self)
        start, end = self._offsets[index], self._offsets[index + 1]
        return _from_json(json.loads(self._data[start:end].tobytes()))

    def __iter__(self) -> Iterator[StudyRecord]:
        return (self[i] for i in range(len(self)))

    @property
    def nbytes(self) -> int:
        return int(self._data.nbytes + self._offsets.nbytes)


class PackedItems(Sequence[tuple[int, "int | None"]]):
    """A dataset's ``(record, window)`` pairs (window None: the record's one sample) in arrays."""

    def __init__(self, items: Sequence[tuple[int, int | None]]) -> None:
        self._records = np.fromiter((r for r, _ in items), dtype=np.int64, count=len(items))
        self._windows = np.fromiter(
            (-1 if w is None else w for _, w in items), dtype=np.int64, count=len(items)
        )

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> tuple[int, int | None]:  # type: ignore[override]
        window = int(self._windows[index])
        return int(self._records[index]), (None if window < 0 else window)

    def __iter__(self) -> Iterator[tuple[int, int | None]]:
        return (self[i] for i in range(len(self)))


def ready_for_workers(datasets: Iterable[Any]) -> None:
    """Keep forked DataLoader workers from copying the records' memory (since 0.3).

    The datasets' records are packed
    (:meth:`~umbrella_core.data.dataset.RecordDataset.pack`) into arrays the
    workers read without touching Python objects, and everything alive now is moved out of the
    garbage collector's reach (``gc.freeze``): a full collection in a worker
    would otherwise write to every object and so copy every page.
    """
    import gc

    for dataset in datasets:
        if dataset is not None:
            dataset.pack()
    gc.collect()
    gc.freeze()
