"""The original BrainVLM conversation files (formats v1 and v2), read as UMBRELLA records.

**v1**, one record per sample::

    {"id": "sub-001",                          # optional, as are subject_id / subject
     "modality_paths": {"T1": "sub-001/T1.nii.gz", "fMRI": "sub-001/rest.nii.gz"},
     "conversations": [{"from": "human", "value": "<image>\\nDescribe the scan."},
                       {"from": "gpt", "value": "..."}]}

Modality names are kept as written (``T1``, ``sMRI``, ``bold``, ``DWI``); the
core resolves names and aliases later, so any installed modality may appear.
A path may be a list of files (one per channel); a ``null`` path means the
modality is absent for this subject and is skipped. Images are in the order of
``modality_paths``. The subject is ``subject_id``, ``subject`` or ``id``, in
that order of preference, else ``FILE-STEM-INDEX``.

*Placeholders*: BrainVLM files often leave ``<image>`` out of the human turns.
When the human turns hold **fewer** ``<image>`` placeholders than the record
has images, the missing ones are prepended to the first human turn, one per
line, so that the images come before the question as LLaVA places them. Any
other mismatch (more placeholders than images, placeholders in a gpt turn) is
a :class:`~umbrella_core.errors.DataError`.

**v2**, one record per sample::

    {"task_id": "T1-sex",
     "subject_ids": ["sub-001"],
     "images": [{"path": "sub-001/T1.nii.gz", "modality": "T1"}],
     "conversations": [{"role": "user",
                        "content": [{"type": "image"}, {"type": "text", "text": "Sex?"}]},
                       {"role": "assistant", "content": [{"type": "text", "text": "female"}]}],
     "metadata": {"age": 63}}

An ``{"type": "image"}`` item becomes an ``<image>`` placeholder at its
position; the items of one turn are joined with newlines (a plain string
``content`` is taken as it is). Because v2 places its images explicitly, the
placeholder count must equal the image count (nothing is prepended).
``metadata`` becomes the phenotypes, with ``task_id`` added under that name;
the subject is ``subject_ids`` joined by ``+``.

Both versions may carry ``split`` (``train``, ``validation``, ``test``;
else the study option ``split``; else none, and UMBRELLA makes a split, see
:mod:`umbrella_core.data.split`), ``family`` (a family id, kept on one side
of a split) and ``site`` (the acquisition site). A ``.jsonl`` file holds one
record per line; a ``.json`` file holds a list of records or an object with
the list under ``records``, ``data`` or ``samples``. Relative paths are
relative to the file's folder. Errors name the file, the line (JSONL) or
record index (JSON), and the field.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Generator, Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs

from umbrella_core.data.manifest import check_record, optional_text, require_field
from umbrella_core.errors import DataError
from umbrella_core.types import IMAGE_PLACEHOLDER, ImageRef, StudyRecord, Turn

__all__ = [
    "PREFIX",
    "LIST_KEYS",
    "BrainVLMStudy",
    "find_brainvlm",
    "is_brainvlm_record",
    "read_brainvlm",
    "record_from_brainvlm",
]

#: The ``kind:`` prefix that names a BrainVLM file explicitly.
PREFIX = "brainvlm:"
#: Keys under which a ``.json`` object may hold its list of records.
LIST_KEYS = ("records", "data", "samples")

#: Called with each record-level error when reading tolerantly.
ErrorHandler = Callable[[DataError], None]
#: ``convert(obj, where, index)``: a record, or None when ``on_error`` took its error.
_Convert = Callable[[Any, str, int], "StudyRecord | None"]


def is_brainvlm_record(obj: Any) -> bool:
    """Whether one JSON value looks like a BrainVLM v1 or v2 record (cheap, never raises)."""
    if not isinstance(obj, Mapping):
        return False
    if "modality_paths" in obj:
        return True
    conversations = obj.get("conversations")
    # UMBRELLA manifests say "conversation" with string content, so list
    # content under "conversations" is what sets v2 apart.
    return (
        "images" in obj
        and isinstance(conversations, list)
        and any(
            isinstance(t, Mapping) and isinstance(t.get("content"), list) for t in conversations
        )
    )


def _record_list(obj: Any) -> list[Any] | None:
    if isinstance(obj, list):
        return obj
    if isinstance(obj, Mapping):
        for key in LIST_KEYS:
            if isinstance(obj.get(key), list):
                return obj[key]
    return None


def _first_jsonl_value(path: Path) -> Any:
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                return json.loads(line)
    return None


def find_brainvlm(location: str) -> BrainVLMStudy | None:
    """The BrainVLM study at ``location``, or None when it is not one.

    ``brainvlm:PATH`` is always claimed (a missing file is reported when the
    records are read). An unprefixed ``.json``/``.jsonl`` file is claimed when
    its first record is a BrainVLM record; anything unreadable is left to the
    other readers, whose errors name the problem. For ``.json`` files the
    parsed content is kept, so the file is parsed once.
    """
    if location.startswith(PREFIX):
        return BrainVLMStudy(path=Path(location[len(PREFIX) :]).expanduser())
    path = Path(location).expanduser()
    if path.suffix not in (".json", ".jsonl") or not path.is_file():
        return None
    try:
        if path.suffix == ".jsonl":
            return (
                BrainVLMStudy(path=path) if is_brainvlm_record(_first_jsonl_value(path)) else None
            )
        parsed = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    records = _record_list(parsed)
    if records and is_brainvlm_record(records[0]):
        return BrainVLMStudy(path=path, parsed=parsed)
    if isinstance(parsed, Mapping) and is_brainvlm_record(parsed):
        return BrainVLMStudy(path=path, parsed=[parsed])
    return None


@attrs.frozen
class BrainVLMStudy:
    """A BrainVLM file: iterating yields its records, stopping at the first bad one.

    Attributes:
        path: The ``.json`` or ``.jsonl`` file.
        options: The study's settings (``split``: split of records without
            one; ``study``: study name).
        parsed: The already parsed content of a ``.json`` file, if any.
    """

    path: Path
    options: Mapping[str, Any] = attrs.field(factory=dict)
    parsed: Any = attrs.field(default=None, eq=False, repr=False)

    def __iter__(self) -> Iterator[StudyRecord]:
        return read_brainvlm(self.path, options=self.options, parsed=self.parsed)

    def records(self, on_error: ErrorHandler) -> Iterator[StudyRecord]:
        """Yield every good record; each bad one goes to ``on_error`` and reading goes on."""
        return read_brainvlm(self.path, options=self.options, parsed=self.parsed, on_error=on_error)


def read_brainvlm(
    path: str | os.PathLike[str],
    *,
    options: Mapping[str, Any] | None = None,
    parsed: Any = None,
    on_error: ErrorHandler | None = None,
) -> Iterator[StudyRecord]:
    """Yield the records of a BrainVLM ``.json`` or ``.jsonl`` file.

    Args:
        path: The file.
        options: ``split`` (split of records without one; default: none,
            UMBRELLA makes one) and ``study`` (study name; default: the file's
            folder name).
        parsed: The file's parsed JSON, when the caller already has it.
        on_error: When given, a record that cannot be used (bad JSON line,
            missing field, placeholder mismatch) is passed to it and the
            following records are still read; without it the first one raises.
            Errors about the whole file always raise.

    Raises:
        DataError: The file cannot be read or parsed, holds no records, or
            (without ``on_error``) a record is bad. The message names the file,
            line or record index, and field.
    """
    path = Path(path)
    options = dict(options or {})
    root = path.parent
    study = str(options.get("study") or path.parent.name or "brainvlm")
    split = options.get("split")
    split = None if split is None else str(split)

    def convert(obj: Any, where: str, index: int) -> StudyRecord | None:
        try:
            return record_from_brainvlm(
                obj, root=root, where=where, study=study, split=split, index=f"{path.stem}-{index}"
            )
        except DataError as error:
            if on_error is None:
                raise
            on_error(error)
            return None

    if parsed is None:
        text = _read_text(path)
        if path.suffix == ".jsonl":
            seen = yield from _jsonl_records(path, text, convert, on_error)
        else:
            seen = yield from _listed_records(path, _parse_json(path, text), convert)
    else:
        seen = yield from _listed_records(path, parsed, convert)
    if not seen:
        raise DataError(
            f"{path}: the BrainVLM file holds no records; add records or remove the study"
        )


def _read_text(path: Path) -> str:
    """The file's text; DataError when it cannot be read or is not UTF-8."""
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise DataError(f"{path}: cannot read the BrainVLM file: {reason}") from None


def _parse_json(path: Path, text: str) -> Any:
    """A ``.json`` file's value; DataError naming the line when it is not JSON."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path}:{exc.lineno}: invalid JSON: {exc.msg} (column {exc.colno}); "
            "fix the JSON or remove the line"
        ) from None


def _jsonl_records(
    path: Path, text: str, convert: _Convert, on_error: ErrorHandler | None
) -> Generator[StudyRecord, None, int]:
    """Yield the records of a ``.jsonl`` file's lines; returns how many lines held one."""
    seen = 0
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        seen += 1
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            error = DataError(
                f"{where}: invalid JSON: {exc.msg} (column {exc.colno}); "
                "fix the JSON or remove the line",
                source=where,
                field="json",
            )
            if on_error is None:
                raise error from None
            on_error(error)
            continue
        record = convert(obj, where, seen - 1)
        if record is not None:
            yield record
    return seen


def _listed_records(
    path: Path, parsed: Any, convert: _Convert
) -> Generator[StudyRecord, None, int]:
    """Yield the records of a parsed ``.json`` file's list; returns how many it lists."""
    items = _record_list(parsed)
    if items is None:
        raise DataError(
            f"{path}: expected a list of BrainVLM records or an object with one of "
            f"{', '.join(LIST_KEYS)}"
        )
    for i, item in enumerate(items):
        record = convert(item, f"{path}: records[{i}]", i)
        if record is not None:
            yield record
    return len(items)


def record_from_brainvlm(
    obj: Any,
    *,
    root: Path,
    where: str,
    study: str,
    split: str | None = None,
    index: str = "",
) -> StudyRecord:
    """Turn one BrainVLM v1 or v2 record into a StudyRecord (checked with ``check_record``).

    Args:
        obj: The parsed record.
        root: Folder relative paths are relative to.
        where: ``FILE:LINE`` or ``FILE: records[i]``, for messages and ``source``.
        study: Study name of the record.
        split: Split of a record that does not name one (None: no split).
        index: Subject of a v1 record that names none.

    Raises:
        DataError: naming ``where`` and the field.
    """
    if not isinstance(obj, Mapping):
        raise DataError(
            f"{where}: a record must be a JSON object, got {type(obj).__name__}",
            source=where,
            field="record",
        )
    if "modality_paths" in obj:
        subject, images, turns, phenotypes = _v1(obj, root, where, index)
    elif "images" in obj or "conversations" in obj:
        subject, images, turns, phenotypes = _v2(obj, root, where)
    else:
        raise DataError(
            f"{where}: field 'modality_paths' (BrainVLM v1) or 'images' (v2) is missing",
            source=where,
            field="modality_paths",
        )
    record = StudyRecord(
        subject=subject,
        images=images,
        turns=turns,
        study=study,
        split=optional_text(obj, "split", where) or split,
        family=optional_text(obj, "family", where),
        site=optional_text(obj, "site", where),
        phenotypes=phenotypes,
        source=where,
    )
    check_record(record)
    return record


def _paths(raw: Any, root: Path, where: str, field: str) -> list[str]:
    paths = [raw] if isinstance(raw, str) else raw
    if not isinstance(paths, list) or not paths or not all(isinstance(p, str) and p for p in paths):
        raise DataError(
            f"{where}: field {field!r} must be a path or a list of paths", source=where, field=field
        )
    return [str(root / p) for p in paths]


def _v1(
    obj: Mapping[str, Any], root: Path, where: str, index: str
) -> tuple[str, list[ImageRef], list[Turn], dict[str, Any]]:
    modality_paths = require_field(obj, "modality_paths", Mapping, where)
    images = []
    for name, raw in modality_paths.items():
        if raw is None:
            continue  # BrainVLM writes null for a modality the subject lacks
        field = f"modality_paths.{name}"
        images.append(ImageRef(modality=str(name), paths=_paths(raw, root, where, field)))
    turns = []
    for i, turn in enumerate(require_field(obj, "conversations", list, where)):
        if not isinstance(turn, Mapping):
            raise DataError(
                f"{where}: field 'conversations[{i}]' must be an object",
                source=where,
                field=f"conversations[{i}]",
            )
        role = turn.get("from", turn.get("role", ""))
        value = turn.get("value", turn.get("content", ""))
        if not isinstance(value, str):
            raise DataError(
                f"{where}: field 'conversations[{i}].value' must be str, "
                f"got {type(value).__name__}",
                source=where,
                field=f"conversations[{i}].value",
            )
        try:
            turns.append(Turn(role=role, content=value))
        except ValueError as exc:
            raise DataError(
                f"{where}: field 'conversations[{i}].from': {exc}",
                source=where,
                field=f"conversations[{i}].from",
            ) from None
    turns = _prepend_placeholders(turns, len(images))
    subject = next(
        (obj[k] for k in ("subject_id", "subject", "id") if obj.get(k) not in (None, "")), index
    )
    if not isinstance(subject, (str, int)):
        raise DataError(
            f"{where}: field 'subject_id' must be str, got {type(subject).__name__}",
            source=where,
            field="subject_id",
        )
    phenotypes = dict(obj.get("metadata") or {})
    return str(subject), images, turns, phenotypes


def _prepend_placeholders(turns: list[Turn], images: int) -> list[Turn]:
    """Add the ``<image>`` placeholders a v1 record leaves out (see the module docstring)."""
    present = sum(t.content.count(IMAGE_PLACEHOLDER) for t in turns if t.role == "user")
    missing = images - present
    first_user = next((i for i, t in enumerate(turns) if t.role == "user"), None)
    if missing <= 0 or first_user is None:
        return turns  # check_record reports what is left
    turn = turns[first_user]
    turns[first_user] = attrs.evolve(
        turn, content=f"{IMAGE_PLACEHOLDER}\n" * missing + turn.content
    )
    return turns


def _v2(
    obj: Mapping[str, Any], root: Path, where: str
) -> tuple[str, list[ImageRef], list[Turn], dict[str, Any]]:
    images = []
    for i, image in enumerate(require_field(obj, "images", list, where)):
        field = f"images[{i}]"
        if not isinstance(image, Mapping):
            raise DataError(
                f"{where}: field {field!r} must be an object with path and modality",
                source=where,
                field=field,
            )
        modality = require_field(image, "modality", str, where, field)
        raw = require_field(image, "path", (str, list), where, field)
        images.append(ImageRef(modality=modality, paths=_paths(raw, root, where, f"{field}.path")))
    turns = []
    for i, turn in enumerate(require_field(obj, "conversations", list, where)):
        field = f"conversations[{i}]"
        if not isinstance(turn, Mapping):
            raise DataError(
                f"{where}: field {field!r} must be an object", source=where, field=field
            )
        content = turn.get("content", "")
        if isinstance(content, list):
            content = _v2_content(content, where, field)
        elif not isinstance(content, str):
            raise DataError(
                f"{where}: field '{field}.content' must be a list or str, "
                f"got {type(content).__name__}",
                source=where,
                field=f"{field}.content",
            )
        try:
            turns.append(Turn(role=turn.get("role", turn.get("from", "")), content=content))
        except ValueError as exc:
            raise DataError(
                f"{where}: field '{field}.role': {exc}", source=where, field=f"{field}.role"
            ) from None
    subject_ids = obj.get("subject_ids", obj.get("subject_id"))
    if isinstance(subject_ids, (str, int)):
        subject_ids = [subject_ids]
    if not isinstance(subject_ids, list) or not subject_ids:
        raise DataError(
            f"{where}: field 'subject_ids' must be a non-empty list of subject ids",
            source=where,
            field="subject_ids",
        )
    metadata = obj.get("metadata") or {}
    if not isinstance(metadata, Mapping):
        raise DataError(
            f"{where}: field 'metadata' must be an object, got {type(metadata).__name__}",
            source=where,
            field="metadata",
        )
    phenotypes = dict(metadata)
    if "task_id" in obj:
        phenotypes.setdefault("task_id", obj["task_id"])
    return "+".join(str(s) for s in subject_ids), images, turns, phenotypes


def _v2_content(items: list[Any], where: str, field: str) -> str:
    parts = []
    for j, item in enumerate(items):
        here = f"{field}.content[{j}]"
        if not isinstance(item, Mapping):
            raise DataError(
                f"{where}: field {here!r} must be an object with a type", source=where, field=here
            )
        kind = item.get("type")
        if kind == "image":
            parts.append(IMAGE_PLACEHOLDER)
        elif kind == "text":
            text = item.get("text", "")
            if not isinstance(text, str):
                raise DataError(
                    f"{where}: field '{here}.text' must be str, got {type(text).__name__}",
                    source=where,
                    field=f"{here}.text",
                )
            parts.append(text)
        else:
            raise DataError(
                f"{where}: field '{here}.type' must be 'text' or 'image', got {kind!r}",
                source=where,
                field=f"{here}.type",
            )
    return "\n".join(parts)
