"""The UMBRELLA conversation manifest (JSON or JSONL).

One record per sample::

    {"subject": "sub-001",
     "session": "ses-1",                      # optional
     "split": "train",                        # optional: train | validation | test
     "family": "F0042",                       # optional: kept on one side of a split
     "site": "NYU",                           # optional: acquisition site
     "images": [{"modality": "t1", "path": "t1/sub-001_T1w.nii.gz"},
                {"modality": "dmri", "path": ["sub-001_FA.nii.gz", "sub-001_MD.nii.gz"]}],
     "conversation": [{"role": "user", "content": "<image>\\n<image>\\nDescribe both scans."},
                      {"role": "assistant", "content": "..."}],
     "phenotypes": {"age": 63, "sex": "F"},   # optional
     "laterality": "swap",                    # optional: refuse | swap | ignore
     "forbid_augment": ["spatial"]}           # optional: names, or spatial

``laterality`` and ``forbid_augment`` say what augmentation may do to the
record's images (:attr:`~umbrella_core.types.StudyRecord.laterality`,
:attr:`~umbrella_core.types.StudyRecord.forbid_augment`).

A ``.jsonl`` file holds one record per line; a ``.json`` file holds a list of
records or ``{"study": NAME, "records": [...]}``. Relative image paths are
relative to the manifest's folder. Each ``<image>`` placeholder in the user
turns stands for the next image, in order.

``split``: a study whose records give none gets a split made by UMBRELLA
(``data.split`` in the run configuration: by family where records name one,
else by subject); in a study where some records give one, records without
one are ``train``. A subject (and a family) must not be on two sides
(:mod:`umbrella_core.data.split`). A record about several subjects joins
their ids with ``+`` in ``subject`` (and their families and sites, where
given, in ``family`` and ``site``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from umbrella_core.errors import DataError
from umbrella_core.types import IMAGE_PLACEHOLDER, ImageRef, StudyRecord, Turn

__all__ = ["MANIFEST_NAMES", "find_manifest", "read_manifest", "record_from_json", "check_record"]

MANIFEST_NAMES = ("manifest.jsonl", "manifest.json")


def find_manifest(location: str) -> Path | None:
    """The manifest file ``location`` points at, or None when it is not a manifest."""
    if location.startswith("manifest:"):
        location = location[len("manifest:") :]
    path = Path(location).expanduser()
    if path.is_file() and path.suffix in (".json", ".jsonl"):
        return path
    if path.is_dir():
        for name in MANIFEST_NAMES:
            if (path / name).is_file():
                return path / name
    return None


_MISSING = object()


def require_field(
    obj: Mapping[str, Any],
    key: str,
    kind: type | tuple[type, ...],
    where: str,
    item: str = "",
) -> Any:
    """``obj[key]``, of type ``kind``; ``item`` names the list item ``obj`` is (``images[0]``)."""
    value = obj.get(key, _MISSING)
    if isinstance(value, kind):
        return value
    field = f"{item}.{key}" if item else key
    shown = f"{where}: {item}" if item else where
    if value is _MISSING:
        raise DataError(f"{shown}: field {key!r} is missing", source=where, field=field)
    names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
    raise DataError(
        f"{shown}: field {key!r} must be {names}, got {type(value).__name__}",
        source=where,
        field=field,
    )


def record_from_json(obj: Any, *, root: Path, where: str, study: str) -> StudyRecord:
    """Turn one JSON record into a StudyRecord, naming ``where`` (file:line) on any problem."""
    if not isinstance(obj, Mapping):
        raise DataError(
            f"{where}: a record must be a JSON object, got {type(obj).__name__}",
            source=where,
            field="record",
        )
    subject = require_field(obj, "subject", (str, int), where)
    base = "" if str(root) == "." else str(root)
    images = []
    for i, image in enumerate(obj.get("images", [])):
        field = f"images[{i}]"
        if not isinstance(image, Mapping):
            raise DataError(
                f"{where}: field {field!r} must be an object with modality and path",
                source=where,
                field=field,
            )
        modality = require_field(image, "modality", str, where, field)
        raw = require_field(image, "path", (str, list), where, field)
        paths = [raw] if isinstance(raw, str) else raw
        if not paths or not all(isinstance(p, str) and p for p in paths):
            raise DataError(
                f"{where}: field '{field}.path' must be a path or a list of paths",
                source=where,
                field=f"{field}.path",
            )
        # os.path.join, not Path /: a third of reading a 100,000-record manifest.
        images.append(ImageRef(modality=modality, paths=[os.path.join(base, p) for p in paths]))
    turns = []
    for i, turn in enumerate(require_field(obj, "conversation", list, where)):
        if not isinstance(turn, Mapping):
            raise DataError(
                f"{where}: field 'conversation[{i}]' must be an object",
                source=where,
                field=f"conversation[{i}]",
            )
        try:
            turns.append(Turn(role=turn.get("role", ""), content=turn.get("content", "")))
        except ValueError as exc:
            raise DataError(
                f"{where}: field 'conversation[{i}].role': {exc}",
                source=where,
                field=f"conversation[{i}].role",
            ) from None
    record = StudyRecord(
        subject=subject,
        session=obj.get("session"),
        split=optional_text(obj, "split", where),
        family=optional_text(obj, "family", where),
        site=optional_text(obj, "site", where),
        images=images,
        turns=turns,
        study=str(obj.get("study", study)),
        phenotypes=dict(obj.get("phenotypes", {})),
        source=where,
        laterality=_laterality(obj, where),
        forbid_augment=_names(obj, "forbid_augment", where),
    )
    check_record(record)
    return record


def optional_text(obj: Mapping[str, Any], key: str, where: str) -> str | None:
    """An optional string field (numbers accepted, as ids often are); None when absent."""
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(
            f"{where}: field {key!r} must be a string, got {type(value).__name__}",
            source=where,
            field=key,
        )
    return str(value)


def _laterality(obj: Mapping[str, Any], where: str) -> str | None:
    value = obj.get("laterality")
    if value is None or value in ("refuse", "swap", "ignore"):
        return value
    raise DataError(
        f"{where}: field 'laterality' must be refuse, swap or ignore, got {value!r}",
        source=where,
        field="laterality",
    )


def _names(obj: Mapping[str, Any], key: str, where: str) -> tuple[str, ...]:
    value = obj.get(key, [])
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DataError(
            f"{where}: field {key!r} must be a name or a list of names", source=where, field=key
        )
    return tuple(value)


def check_record(record: StudyRecord) -> None:
    """Structural checks every record must pass, whatever reader produced it."""
    where = record.source or f"subject {record.subject}"
    if not any(t.role == "assistant" for t in record.turns):
        raise DataError(
            f"{where}: the conversation has no assistant turn to learn from; "
            "add the answer as an assistant turn",
            source=where,
            field="conversation",
        )
    placeholders = sum(t.content.count(IMAGE_PLACEHOLDER) for t in record.turns if t.role == "user")
    in_assistant = sum(t.content.count(IMAGE_PLACEHOLDER) for t in record.turns if t.role != "user")
    if in_assistant:
        raise DataError(
            f"{where}: {IMAGE_PLACEHOLDER} may only appear in user turns",
            source=where,
            field="conversation",
        )
    if placeholders != len(record.images):
        raise DataError(
            f"{where}: the conversation has {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) "
            f"but the record lists {len(record.images)} image(s); put one "
            f"{IMAGE_PLACEHOLDER} in a user turn for each image",
            source=where,
            field="conversation",
        )
    if record.split is not None and record.split not in ("train", "validation", "test"):
        raise DataError(
            f"{where}: field 'split' must be train, validation or test (or absent), "
            f"got {record.split!r}",
            source=where,
            field="split",
        )


def read_manifest(
    path: Path, on_error: Callable[[DataError], None] | None = None
) -> Iterator[StudyRecord]:
    """Yield the records of a JSON or JSONL manifest.

    Args:
        path: The manifest.
        on_error: Without it, the first bad line or record raises. With it,
            each bad line or record is passed to it and reading goes on
            (``umbrella validate`` reports them all). Errors about the whole
            file (unreadable, not JSON, no records) always raise.
    """

    def fail(error: DataError) -> None:
        if on_error is None:
            raise error
        on_error(error)

    root = path.parent
    study = path.parent.name or "manifest"
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise DataError(f"{path}: cannot read the manifest: {reason}") from None
    items: Iterable[tuple[str, Any]]
    if path.suffix == ".jsonl":
        lines = text.splitlines()
        del text
        if not any(line.strip() for line in lines):
            items = []
        else:
            # Parsed as read, not all first: 100,000 parsed lines at once were
            # a third of reading a cohort's peak memory.
            items = _jsonl_items(path, lines)
    else:
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path}:{exc.lineno}: invalid JSON: {exc.msg} (column {exc.colno}); "
                "fix the JSON or remove the line"
            ) from None
        if isinstance(obj, Mapping):
            study = str(obj.get("study", study))
            records = require_field(obj, "records", list, str(path))
        elif isinstance(obj, list):
            records = obj
        else:
            raise DataError(f"{path}: expected a list of records or an object with 'records'")
        items = [(f"{path}: records[{i}]", item) for i, item in enumerate(records)]
    if not items:  # an empty list: a generator has a line to give
        raise DataError(f"{path}: the manifest holds no records; add records or remove the study")
    for where, item in items:
        if isinstance(item, DataError):
            fail(item)
            continue
        try:
            record = record_from_json(item, root=root, where=where, study=study)
        except DataError as error:
            fail(error)
            continue
        yield record


def _jsonl_items(path: Path, lines: list[str]) -> Iterator[tuple[str, Any]]:
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{lineno}", json.loads(line)
        except json.JSONDecodeError as exc:
            # Reported in its place among the records, when reading reaches it.
            yield (
                f"{path}:{lineno}",
                DataError(
                    f"{path}:{lineno}: invalid JSON: {exc.msg} (column {exc.colno}); "
                    "fix the JSON or remove the line",
                    source=f"{path}:{lineno}",
                    field="json",
                ),
            )
