"""The table of a split: one row per subject and its side, written as ``split.tsv`` and read back.

What :func:`umbrella_core.data.split.assign_splits` decided, in a form a run
writes to its output folder and ``data.split.file`` gives back (re-exported by
:mod:`umbrella_core.data.split`).
"""

from __future__ import annotations

import os
from pathlib import Path

import attrs

from umbrella_core.errors import DataError
from umbrella_core.types._convert import as_tuple

__all__ = ["SPLITS", "SPLIT_FILE", "COLUMNS", "SplitRow", "SplitTable", "split_file_of_checkpoint"]

#: A subject: (study, subject id).
Key = tuple[str, str]

#: The sides, in the order counts are shown.
SPLITS = ("train", "validation", "test")
#: The name a run gives its split table, in its output folder.
SPLIT_FILE = "split.tsv"
#: The columns of a split table, in file order.
COLUMNS = ("study", "subject", "family", "site", "split", "made")


@attrs.frozen(kw_only=True)
class SplitRow:
    """What was decided for one subject of one study.

    Attributes:
        study: The study name records carry.
        subject: The subject id.
        family: Its family, if the records name one.
        site: Its site, if the records name one.
        split: ``train``, ``validation`` or ``test``.
        made: True when UMBRELLA assigned the side, False when the study gave it.
        where: ``file:line`` of a row read from a file, for messages.
    """

    study: str
    subject: str
    family: str | None = None
    site: str | None = None
    split: str
    made: bool
    where: str = attrs.field(default="", eq=False)

    @property
    def key(self) -> Key:
        return (self.study, self.subject)


@attrs.frozen(kw_only=True)
class SplitTable:
    """The split of a run: one :class:`SplitRow` per ``(study, subject)``, sorted.

    Attributes:
        rows: The rows.
        by: How the made splits grouped subjects (``family``, ``subject``,
            ``family/subject`` where studies differ); empty where none was made.
        seed: ``data.split.seed`` where a split was made.
        file: The file the sides came from (``data.split.file``), if any.
    """

    rows: tuple[SplitRow, ...] = attrs.field(converter=as_tuple)
    by: str = ""
    seed: int | None = None
    file: str = ""

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def table(self) -> SplitTable:
        """The table itself: ``StudyData.split`` is one, and ``data.split.table.write(...)``
        reads as well as ``data.split.write(...)``."""
        return self

    def sides(self) -> dict[Key, str]:
        """``(study, subject)`` to its side."""
        return {row.key: row.split for row in self.rows}

    def counts(self) -> dict[str, int]:
        """Subjects per side (every side present, possibly 0)."""
        counts = dict.fromkeys(SPLITS, 0)
        for row in self.rows:
            counts[row.split] += 1
        return counts

    def describe(self) -> str:
        """One line for the run's log.

        ``split (made, by family, seed 0): 1,234 train / 154 validation / 155 test subjects``
        """
        made = sum(row.made for row in self.rows)
        if self.file:
            how = f"from {self.file}"
        elif made == len(self.rows) and made:
            how = f"made, by {self.by}, seed {self.seed}"
        elif made:
            how = f"made where the studies give none, by {self.by}, seed {self.seed}"
        else:
            how = "given by the studies"
        counts = " / ".join(f"{n:,} {side}" for side, n in self.counts().items())
        return f"split ({how}): {counts} subjects"

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Write the table as TSV with a header row (``split.tsv``); returns the path.

        Raises:
            DataError: an id holds a tab or a line break (it could not be read back).
        """
        path = Path(path)
        lines = ["\t".join(COLUMNS)]
        for row in self.rows:
            fields = [row.study, row.subject, row.family or "", row.site or "", row.split]
            for name, value in zip(COLUMNS, fields, strict=False):
                if any(c in value for c in "\t\r\n"):
                    raise DataError(
                        f"{path}: cannot write the split: {name} {value!r} (subject "
                        f"{row.subject!r} of study {row.study!r}) holds a tab or line break"
                    )
            lines.append("\t".join([*fields, "true" if row.made else "false"]))
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written whole, then renamed: a reader never sees half a split.
        partial = path.with_name(f".{path.name}.partial")
        partial.write_text("\n".join(lines) + "\n", encoding="utf-8")
        partial.replace(path)
        return path

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> SplitTable:
        """Read a table :meth:`write` wrote (``family``, ``site`` and ``made`` may be absent).

        Raises:
            DataError: the file cannot be read, has no ``study``/``subject``/``split``
                header, or a line is malformed (field count, split value, a subject
                twice); the message names the file and line.
        """
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or exc
            raise DataError(f"{path}: cannot read the split file: {reason}") from None
        lines = text.splitlines()
        if not lines or not lines[0].strip():
            raise DataError(f"{path}:1: expected a header row ({chr(9).join(COLUMNS)})")
        header = [name.strip().lower() for name in lines[0].split("\t")]
        missing = [name for name in ("study", "subject", "split") if name not in header]
        if missing:
            raise DataError(
                f"{path}:1: the header has no {missing[0]!r} column; expected "
                f"{', '.join(COLUMNS)} separated by tabs"
            )
        rows: list[SplitRow] = []
        seen: dict[Key, int] = {}
        for lineno, line in enumerate(lines[1:], start=2):
            if not line.strip():
                continue
            fields = line.split("\t")
            where = f"{path}:{lineno}"
            if len(fields) != len(header):
                raise DataError(
                    f"{where}: expected {len(header)} tab-separated fields as in the header, "
                    f"got {len(fields)}"
                )
            cells = dict(zip(header, (f.strip() for f in fields), strict=True))
            if not cells["study"] or not cells["subject"]:
                raise DataError(f"{where}: empty study or subject")
            split = cells["split"].lower()
            if split not in SPLITS:
                raise DataError(
                    f"{where}: split must be train, validation or test, got {cells['split']!r}"
                )
            made = cells.get("made", "true").lower()
            if made not in ("true", "false", ""):
                raise DataError(f"{where}: made must be true or false, got {cells['made']!r}")
            key = (cells["study"], cells["subject"])
            if key in seen:
                raise DataError(
                    f"{where}: subject {key[1]!r} of study {key[0]!r} appears twice "
                    f"(also line {seen[key]})"
                )
            seen[key] = lineno
            rows.append(
                SplitRow(
                    study=key[0],
                    subject=key[1],
                    family=cells.get("family") or None,
                    site=cells.get("site") or None,
                    split=split,
                    made=made != "false",
                    where=where,
                )
            )
        return cls(rows=sorted(rows, key=lambda r: r.key), file=str(path))


def split_file_of_checkpoint(checkpoint: str | os.PathLike[str]) -> Path | None:
    """The ``split.tsv`` of the run a checkpoint belongs to, or None.

    A run writes its split next to its checkpoints (``final/``, ``best/``,
    ``checkpoint-N``), so it is ``<checkpoint>/../split.tsv``.
    """
    path = Path(checkpoint).expanduser().resolve().parent / SPLIT_FILE
    return path if path.is_file() else None
