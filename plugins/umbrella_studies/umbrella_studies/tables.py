"""Phenotype tables (TSV/CSV) read with line numbers, and values parsed once.

Every row keeps where it came from (``participants.tsv:3``) so that a bad
value later on can still name its file and line.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from umbrella_core.errors import DataError

__all__ = [
    "MISSING",
    "Row",
    "PhenotypeTable",
    "parse_value",
    "read_table",
    "read_json",
    "first_present",
    "phenotype_file",
]

#: Cell values read as "missing" (BIDS writes ``n/a``; spreadsheets write the rest).
MISSING = frozenset({"", "n/a", "na", "nan", "null", "none", "-999", "-9999"})


def parse_value(text: str) -> Any:
    """A cell as a number where it reads as one, None where missing, else the stripped text."""
    value = text.strip()
    if value.lower() in MISSING:
        return None
    if "_" in value:
        # Python's int() and float() read "51488_81352" (an HCP family id) as 5148881352.
        return value
    try:
        return int(value)
    except ValueError:
        pass
    try:
        number = float(value)
    except ValueError:
        return value
    # "inf" and "nan"-like words are text to a phenotype table, not numbers.
    return number if number == number and abs(number) != float("inf") else value


@attrs.frozen
class Row:
    """One data row: its parsed values by column and where it was read (``file:line``)."""

    values: dict[str, Any]
    where: str


def read_table(path: Path) -> tuple[list[str], list[Row]]:
    """Read a TSV (``.tsv``, ``.txt``) or CSV (``.csv``) file with a header row.

    Raises:
        DataError: the file cannot be read, has no header, or a row has another
            number of fields than the header; the message names the file and line.
    """
    import io

    delimiter = "," if path.suffix.lower() == ".csv" else "\t"
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read the table: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        column = exc.start - raw.rfind(b"\n", 0, exc.start)
        raise DataError(
            f"{path}:{line}: not UTF-8 (byte 0x{raw[exc.start]:02x}, column {column}); "
            "save the table as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from None
    handle = io.StringIO(text, newline="")
    rows: list[Row] = []
    with handle:
        reader = csv.reader(handle, delimiter=delimiter)
        try:
            header = [name.strip() for name in next(reader)]
        except StopIteration:
            raise DataError(f"{path}: the table is empty (expected a header row)") from None
        except csv.Error as exc:
            raise DataError(f"{path}:1: malformed header: {exc}") from None
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                raise DataError(f"{path}:{reader.line_num}: malformed row: {exc}") from None
            if not any(field.strip() for field in fields):
                continue
            if len(fields) != len(header):
                raise DataError(
                    f"{path}:{reader.line_num}: expected {len(header)} fields as in the header, "
                    f"got {len(fields)}"
                )
            values = {name: parse_value(field) for name, field in zip(header, fields, strict=True)}
            rows.append(Row(values=values, where=f"{path}:{reader.line_num}"))
    return header, rows


def read_json(path: Path) -> Any:
    """A JSON file's content, or DataError naming the file and line."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from None


@attrs.frozen
class PhenotypeTable:
    """Phenotype rows keyed by subject (and session, where the table has a session column).

    Attributes:
        path: The file, or None when the study has no phenotype file.
        columns: The header, in file order.
        by_subject: Rows keyed by the normalised subject key.
        by_session: Rows keyed by ``(subject key, session label)``; empty when the
            table has no session column. A table with a session column is only
            looked up by session, because age changes between sessions.
    """

    path: Path | None
    columns: tuple[str, ...] = ()
    by_subject: dict[str, Row] = attrs.field(factory=dict)
    by_session: dict[tuple[str, str], Row] = attrs.field(factory=dict)

    @classmethod
    def empty(cls) -> PhenotypeTable:
        return cls(path=None)

    @classmethod
    def load(
        cls,
        path: Path,
        *,
        id_columns: Sequence[str],
        key: Callable[[Any], str],
        session_columns: Sequence[str] = (),
        session_key: Callable[[Any], str] = str,
        skip_row: Callable[[Row], bool] | None = None,
    ) -> PhenotypeTable:
        """Read ``path`` and index its rows.

        Args:
            path: The TSV/CSV file.
            id_columns: Candidate names of the subject column; the first present is used.
            key: Normalises a subject id (``sub-01`` and ``01`` to the same key).
            session_columns: Candidate names of a session column, if the cohort has one.
            session_key: Normalises a session value to the folder's session label.
            skip_row: Rows for which this is true are ignored (NDA description rows).

        Raises:
            DataError: no subject column, a malformed row, or two rows for the same
                subject (and session), naming the file and both lines.
        """
        header, rows = read_table(path)
        id_column = _first_present(header, id_columns)
        if id_column is None:
            raise DataError(
                f"{path}:1: no subject column (expected one of {', '.join(id_columns)})"
            )
        session_column = _first_present(header, session_columns)
        by_subject: dict[str, Row] = {}
        by_session: dict[tuple[str, str], Row] = {}
        for row in rows:
            if skip_row is not None and skip_row(row):
                continue
            raw_id = row.values.get(id_column)
            if raw_id is None:
                raise DataError(f"{row.where}: the subject column {id_column!r} is empty")
            subject = key(raw_id)
            if session_column is not None and row.values.get(session_column) is not None:
                index: dict[Any, Row] = by_session
                slot: Any = (subject, session_key(row.values[session_column]))
            else:
                index, slot = by_subject, subject
            if slot in index:
                raise DataError(
                    f"{row.where}: subject {raw_id!r} appears twice (also {index[slot].where})"
                )
            index[slot] = row
        return cls(path=path, columns=tuple(header), by_subject=by_subject, by_session=by_session)

    def lookup(self, subject: str, session: str | None) -> Row | None:
        """The row of ``subject`` (a normalised key) at ``session``, or None."""
        if session is not None and (subject, session) in self.by_session:
            return self.by_session[(subject, session)]
        return self.by_subject.get(subject)


def _first_present(header: Iterable[str], candidates: Sequence[str]) -> str | None:
    lowered = {name.lower(): name for name in header}
    for candidate in candidates:
        if candidate.lower() in lowered:
            return lowered[candidate.lower()]
    return None


def first_present(header: Iterable[str], candidates: Sequence[str]) -> str | None:
    """The header's spelling of the first of ``candidates`` it holds (case-insensitive)."""
    return _first_present(header, candidates)


def phenotype_file(
    folder: Path, options: Mapping[str, Any], names: Sequence[str], *, header: str | None = None
) -> Path | None:
    """The study's phenotype table: ``options["phenotypes"]`` or the first of ``names`` found.

    Args:
        folder: The study folder; a relative ``phenotypes`` option is relative to it.
        options: The study's options.
        names: Glob patterns tried in order in ``folder`` (``participants.tsv``, ``*.csv``).
        header: When given, a globbed file is taken only if its first line names this column.

    Raises:
        DataError: the ``phenotypes`` option names a file that does not exist.
    """
    given = options.get("phenotypes")
    if given is not None:
        path = Path(str(given)).expanduser()
        path = path if path.is_absolute() else folder / path
        if not path.is_file():
            raise DataError(f"options: phenotypes: {path}: no such file")
        return path
    for pattern in names:
        for path in sorted(folder.glob(pattern)):
            if path.is_file() and (header is None or _names_column(path, header)):
                return path
    return None


def _names_column(path: Path, column: str) -> bool:
    try:
        with path.open(encoding="utf-8-sig") as handle:
            first = handle.readline()
    except OSError:
        return False
    delimiter = "," if path.suffix.lower() == ".csv" else "\t"
    return column.lower() in (name.strip().strip('"').lower() for name in first.split(delimiter))
