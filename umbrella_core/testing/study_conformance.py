"""Conformance checks a study plugin runs in its own tests: its reader and its records.

Typical use::

    from umbrella_core.testing import check_study_reader

    def test_conformance(tmp_path):
        folder = write_my_tiny_study(tmp_path / "study")
        bad = write_my_tiny_study(tmp_path / "bad", broken_rows=1)
        check_study_reader(
            plugin, f"mine:{folder}", tmp_path / "scratch", bad_location=f"mine:{bad}"
        )

What the core relies on, and these functions check: the reader gives None for
locations that are not its kind, without raising; its records can train (a
subject, a known split, an answer, one ``<image>`` per image, absolute paths to
files that exist); each record's ``source`` is a place a user can open (a
file, optionally with ``:LINE`` or a row after it); reading twice gives the
same records; and, given a sample with bad records, each one is reported
through ``on_error`` as a DataError with ``source`` and ``field`` while the
good records still come.

Importing this module does not import torch or nibabel.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from umbrella_core.errors import DataError
from umbrella_core.testing.conformance import (
    SPLITS,
    ConformanceError,
    _hooks,
    _plugin_name,
    _require,
)
from umbrella_core.types import IMAGE_PLACEHOLDER, StudyRecord

__all__ = [
    "check_records",
    "check_source",
    "check_study_reader",
    "check_study_reader_ignores_foreign",
    "check_reports_bad_records",
]


def check_records(
    records: Iterable[StudyRecord], *, modalities: Iterable[str] | None = None
) -> list[StudyRecord]:
    """Records a training run can use.

    Each is a StudyRecord with a subject, a split in :data:`SPLITS`, at least
    one assistant turn, exactly as many ``<image>`` placeholders in its user
    turns as images (the tokenizer refuses a mismatch), image files that
    exist, and a ``source`` (:func:`check_source`). ``modalities`` (names)
    limits the modalities the images may name.
    """
    known = set(modalities) if modalities is not None else None
    out = []
    for record in records:
        where = f"record {record.source or record.subject!r}"
        _require(isinstance(record, StudyRecord), f"reader yielded {type(record).__name__}")
        _require(str(record.subject).strip(), f"{where}: empty subject")
        # None: the study gives no split and UMBRELLA makes one (data.split).
        _require(
            record.split is None or record.split in SPLITS,
            f"{where}: split {record.split!r} not in {SPLITS} (or None)",
        )
        _require(
            any(t.role == "assistant" and t.content.strip() for t in record.turns),
            f"{where}: no assistant turn with an answer",
        )
        placeholders = sum(t.content.count(IMAGE_PLACEHOLDER) for t in record.turns)
        _require(
            placeholders == len(record.images),
            f"{where}: {placeholders} {IMAGE_PLACEHOLDER} placeholders for "
            f"{len(record.images)} images",
        )
        _require(
            all(t.role == "user" for t in record.turns if IMAGE_PLACEHOLDER in t.content),
            f"{where}: an {IMAGE_PLACEHOLDER} placeholder in an assistant turn",
        )
        for image in record.images:
            _require(image.paths, f"{where}: image of {image.modality!r} without a file")
            if known is not None:
                _require(
                    image.modality in known,
                    f"{where}: modality {image.modality!r} is not one of {sorted(known)}",
                )
            for path in image.paths:
                _require(os.path.isabs(path), f"{where}: {path} is not an absolute path")
                _require(os.path.exists(path), f"{where}: {path} does not exist")
        check_source(record.source, f"record of subject {record.subject!r}")
        out.append(record)
    return out


def check_source(source: Any, where: str = "record") -> None:
    """``source`` names a place a user can open: an existing file, then optionally more.

    ``FILE``, ``FILE:LINE``, ``FILE: records[3]``, ``FILE (participants.tsv:2)``
    and ``FILE + FILE`` (a record of two scans) all qualify: some prefix of the
    text, ending before a ``:`` or a space, is a file or folder that exists.
    Problems, ``bad_samples.json`` and the non-finite-loss report name records
    by it; records may share one.
    """
    _require(
        isinstance(source, str) and source.strip(),
        f"{where}: source {source!r} is empty; give each record the file (and line or row) "
        "it came from, so a user can find it",
    )
    ends = [i for i, c in enumerate(source) if c in ": "] + [len(source)]
    _require(
        any(source[:i] and os.path.exists(source[:i]) for i in ends),
        f"{where}: source {source!r} does not start with a file or folder that exists; "
        "give the file (and line or row) the record came from",
    )


def _strict(error: DataError) -> None:
    raise ConformanceError(
        f"the reader reported a bad record in a sample that should have none: {error}"
    )


def _read(plugin: object, location: str, options: Mapping[str, Any] | None, on_error: Any) -> Any:
    hooks = _hooks(plugin)
    return hooks.umbrella_study_reader(
        location=location, options=dict(options or {}), on_error=on_error
    )


def check_reports_bad_records(
    plugin: object,
    location: str,
    *,
    options: Mapping[str, Any] | None = None,
    min_records: int = 1,
) -> list[DataError]:
    """The reader reports each bad record of ``location`` through ``on_error`` and goes on.

    ``location`` is a sample of the reader's kind holding at least one bad
    record (an empty required field, a value that does not parse) and at
    least ``min_records`` good ones. Each report must be a DataError whose
    ``source`` (:func:`check_source`) and ``field`` say where and what; the
    good records must still come, checked with :func:`check_records`.

    Returns:
        The reported errors.
    """
    name = _plugin_name(plugin)
    reported: list[Any] = []
    try:
        result = _read(plugin, location, options, reported.append)
        records = check_records(result) if result is not None else None
    except DataError as error:
        raise ConformanceError(
            f"plugin {name!r}: reading {location!r} raised {error}; report a bad record "
            "through on_error (umbrella_study_reader's argument) and go on with the next"
        ) from error
    if records is None:
        raise ConformanceError(f"plugin {name!r} does not recognise its sample {location!r}")
    _require(reported, f"plugin {name!r}: no bad record of {location!r} reached on_error")
    for bad in reported:
        _require(
            isinstance(bad, DataError),
            f"plugin {name!r}: on_error got {type(bad).__name__}, expected a DataError",
        )
        check_source(bad.source, f"plugin {name!r}: the error {str(bad)!r}")
        _require(
            bad.field,
            f"plugin {name!r}: the error {str(bad)!r} names no field (DataError.field)",
        )
    _require(
        len(records) >= min_records,
        f"{location}: {len(records)} good records beside the bad ones, expected at least "
        f"{min_records}: a reader goes on after a bad record",
    )
    return reported


def check_study_reader_ignores_foreign(
    plugin: object, folder: str | os.PathLike[str], *, options: Mapping[str, Any] | None = None
) -> None:
    """The reader returns None (and does not raise) for locations that are not its kind.

    Tried: an empty folder, a folder with an unrelated file, the unrelated
    file itself, a path that does not exist, a folder holding another kind's
    manifest (``manifest.jsonl``), a URL, and an unknown ``kind:`` prefix.
    """
    base = Path(folder)
    empty = base / "foreign-empty"
    empty.mkdir(parents=True, exist_ok=True)
    other = base / "foreign-files"
    other.mkdir(exist_ok=True)
    unrelated = other / "notes.txt"
    unrelated.write_text("not a study\n", encoding="utf-8")
    manifest = base / "foreign-manifest"
    manifest.mkdir(exist_ok=True)
    (manifest / "manifest.jsonl").write_text("", encoding="utf-8")
    locations = [
        str(empty),
        str(other),
        str(unrelated),
        str(base / "does-not-exist"),
        str(manifest),
        "https://example.org/study",
        f"zz-unknown-kind:{empty}",
    ]
    for location in locations:
        try:
            result = _read(plugin, location, options, _strict)
        except Exception as exc:
            raise ConformanceError(
                f"plugin {_plugin_name(plugin)!r}: umbrella_study_reader({location!r}) raised "
                f"{type(exc).__name__}: {exc}; a location that is not yours must give None"
            ) from exc
        _require(
            result is None,
            f"plugin {_plugin_name(plugin)!r}: umbrella_study_reader({location!r}) claimed a "
            "location that is not its kind (it must return None)",
        )


def check_study_reader(
    plugin: object,
    location: str,
    folder: str | os.PathLike[str],
    *,
    options: Mapping[str, Any] | None = None,
    modalities: Iterable[str] | None = None,
    min_records: int = 1,
    bad_location: str | None = None,
) -> list[StudyRecord]:
    """The reader claims ``location`` (its own sample) and no foreign one.

    Args:
        plugin: The plugin module or object.
        location: A sample study of the reader's kind (as a user passes it to ``--study``).
        folder: A scratch folder for the foreign locations.
        options: Reader options to pass.
        modalities: The modality names records may use (default: any).
        min_records: Fewest records the sample must give.
        bad_location: A sample holding bad records beside good ones, for
            :func:`check_reports_bad_records`.

    Returns:
        The records, checked with :func:`check_records`.
    """
    check_study_reader_ignores_foreign(plugin, folder)
    result = _read(plugin, location, options, _strict)
    _require(
        result is not None,
        f"plugin {_plugin_name(plugin)!r} does not recognise its own sample {location!r}",
    )
    records = check_records(result, modalities=modalities)
    _require(
        len(records) >= min_records,
        f"{location}: {len(records)} records, expected at least {min_records}",
    )
    again = list(_read(plugin, location, options, _strict))
    _require(again == records, f"{location}: reading the study twice gave different records")
    if bad_location is not None:
        check_reports_bad_records(plugin, bad_location, options=options)
    return records
