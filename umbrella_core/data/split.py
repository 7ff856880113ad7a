"""Train, validation and test sides that leak neither subjects nor families (ARCHITECTURE I10).

A subject scanned twice, or two siblings, on both sides of a split flatter the
held-out figures: the model has seen the subject (or its twin's brain). So
the unit put on one side is a **group** of ``(study, subject)`` keys joined by

* the subjects one record names together (``sub-01+sub-02``, see
  :attr:`~umbrella_core.types.StudyRecord.subjects`);
* one ``(study, family)`` where ``data.split.by`` is ``family``, or ``auto``
  and the study's records name families;
* one ``(study, site)`` where ``by`` is ``site``.

Every session and image of a subject lands on its group's side.

Per study:

* **given**: some record of the study names a split. Records without one are
  ``train`` (the manifest's default) and nothing is made. A group whose
  records give different splits is a *leak*: a :class:`DataError` naming two
  of its records, or, with ``data.split.leak: warn``, one logged warning and
  the given splits kept.
* **made**: no record names one. The groups are sorted by key and, per
  stratum (the ``stratify`` phenotype of a group's first record; numbers in
  quintile bins; missing values a stratum of their own), shuffled by a
  generator seeded from ``data.split.seed`` and the study and stratum (not
  from the record order, and not from the other studies: adding a study
  leaves the others' splits alone); the first ``round-half-up(test * n)``
  go to ``test``, the next ``round-half-up(validation * n)`` to
  ``validation``, the rest to ``train``; every study keeps a ``train`` group.
* **from a file** (``data.split.file``, a ``split.tsv`` of an earlier run):
  every subject takes the file's side; a subject missing from it is an error,
  and a record whose own split disagrees with it is a leak.

What was decided is a :class:`~umbrella_core.data.split_table.SplitTable`, written to
``OUTPUT_DIR/split.tsv``; given back as ``data.split.file`` it reproduces the split."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from decimal import Decimal
from typing import Any

import attrs

from umbrella_core.config import SplitConfig
from umbrella_core.data.split_table import (
    Key,
    SplitRow,
    SplitTable,
)
from umbrella_core.errors import DataError
from umbrella_core.types import StudyRecord

__all__ = ["assign_splits", "check_leaks"]

#: Numeric phenotypes with more distinct values than this are stratified in quintile bins.
_CATEGORY_LIMIT = 5
_LEAK_HINT = (
    "give each subject (and each family) one split, or set data.split.leak=warn "
    "to keep the given splits anyway"
)

Log = Callable[[str], None]


# --------------------------------------------------------------------------- groups


def _per_subject(value: str | None, count: int) -> list[str | None]:
    """A record's family or site for each of its ``count`` subjects (see StudyRecord)."""
    if value is None:
        return [None] * count
    parts = value.split("+")
    if count > 1 and len(parts) == count:
        return [p or None for p in parts]
    return [value] * count


def _record_order(record: StudyRecord) -> tuple[Any, ...]:
    # A fixed order whatever order the readers gave: one-subject records first,
    # so that a subject's family, site and stratum come from its own records.
    return (
        len(record.subjects) > 1,
        record.subject,
        record.session or "",
        record.source,
        record.modality_key,
        tuple(p for image in record.images for p in image.paths),
    )


class _Graph:
    """Groups of ``(study, subject)`` keys (union-find), with each key's family and site."""

    def __init__(self, records: Sequence[StudyRecord], by: Callable[[str], str]) -> None:
        self.parent: dict[Any, Any] = {}
        self.family: dict[Key, str | None] = {}
        self.site: dict[Key, str | None] = {}
        self.by: dict[str, str] = {}
        self.order = sorted(range(len(records)), key=lambda i: _record_order(records[i]))
        #: Position of each record in ``order``.
        self.rank = {i: position for position, i in enumerate(self.order)}
        self.records_of: dict[Key, list[int]] = {}
        for i in self.order:
            record = records[i]
            study = record.study
            if study not in self.by:
                self.by[study] = by(study)
            subjects = record.subjects
            keys = [(study, s) for s in subjects]
            families = _per_subject(record.family, len(keys))
            sites = _per_subject(record.site, len(keys))
            for key, family, site in zip(keys, families, sites, strict=True):
                self._add(key)
                self.records_of.setdefault(key, []).append(i)
                if self.family.get(key) is None:
                    self.family[key] = family
                if self.site.get(key) is None:
                    self.site[key] = site
                if family is not None and self.by[study] == "family":
                    self._union(key, ("family", study, family))
                if site is not None and self.by[study] == "site":
                    self._union(key, ("site", study, site))
            for key in keys[1:]:
                self._union(keys[0], key)

    def _add(self, node: Any) -> None:
        self.parent.setdefault(node, node)

    def find(self, node: Any) -> Any:
        self._add(node)
        root = node
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[node] != root:
            self.parent[node], node = root, self.parent[node]
        return root

    def _union(self, a: Any, b: Any) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra

    def groups(self) -> dict[str, list[list[Key]]]:
        """Per study, its groups (each a sorted list of keys), sorted by first key."""
        members: dict[Any, list[Key]] = {}
        for key in self.records_of:
            members.setdefault(self.find(key), []).append(key)
        out: dict[str, list[list[Key]]] = {}
        for keys in members.values():
            keys.sort()
            out.setdefault(keys[0][0], []).append(keys)
        for groups in out.values():
            groups.sort()
        return out


def _study_by(config: SplitConfig, records: Sequence[StudyRecord]) -> Callable[[str], str]:
    with_families = {r.study for r in records if r.family is not None}

    def by(study: str) -> str:
        if config.by == "auto":
            return "family" if study in with_families else "subject"
        return config.by

    return by


# --------------------------------------------------------------------------- leaks


@attrs.frozen
class _Leak:
    message: str


#: How a record got its side, as leak messages say it.
_HOW = {"given": "", "default": ", no split given", "file": ", from data.split.file", "made": ""}


def _describe(record: StudyRecord, side: str, how: str) -> str:
    where = record.source or f"a record of study {record.study!r}"
    return f"{where} (subject {record.subject}, {side}{_HOW[how]})"


def _group_leak(
    group: list[Key],
    graph: _Graph,
    records: Sequence[StudyRecord],
    sides: Mapping[int, str],
    how: Mapping[int, str],
) -> _Leak | None:
    """The first two records of ``group`` on different sides, named with what joins them."""
    indices = sorted(
        {i for key in group for i in graph.records_of[key]}, key=graph.rank.__getitem__
    )
    if len({sides[i] for i in indices}) < 2:
        return None
    study = group[0][0]

    def pair(candidates: list[int]) -> tuple[int, int] | None:
        first = candidates[0]
        other = next((i for i in candidates if sides[i] != sides[first]), None)
        return None if other is None else (first, other)

    found: tuple[int, int] | None = None
    what = ""
    for key in group:
        found = pair(graph.records_of[key])
        if found:
            what = f"subject {key[1]} of study {study!r}"
            break
    if found is None:
        for label, values in (("family", graph.family), ("site", graph.site)):
            by_value: dict[str, list[int]] = {}
            for key in group:
                shared = values.get(key)
                if shared is not None:
                    by_value.setdefault(shared, []).extend(graph.records_of[key])
            for value, members in sorted(by_value.items()):
                found = pair(sorted(set(members), key=graph.rank.__getitem__))
                if found:
                    what = f"{label} {value} of study {study!r}"
                    break
            if found:
                break
    if found is None:
        found = pair(indices)
        what = f"one group of subjects of study {study!r} (joined by records naming several)"
    assert found is not None
    a, b = found
    return _Leak(
        f"split leak: {what} is on two sides: "
        f"{_describe(records[a], sides[a], how[a])} and "
        f"{_describe(records[b], sides[b], how[b])}"
    )


def _report(leaks: list[_Leak], leak: str, log: Log) -> None:
    if not leaks:
        return
    more = f" (and {len(leaks) - 1} more)" if len(leaks) > 1 else ""
    if leak == "error":
        raise DataError(f"{leaks[0].message}{more}; {_LEAK_HINT}")
    log(
        f"warning: {len(leaks)} split leak(s) kept as the studies give them "
        f"(data.split.leak=warn); first: {leaks[0].message}"
    )


def check_leaks(
    records: Iterable[StudyRecord], *, leak: str = "error", log: Log = print
) -> list[str]:
    """Check that no ``(study, subject)`` and no ``(study, family)`` is on two sides.

    Subjects named together in one record count as one group too. Records
    without a split are on no side and are not checked.

    Args:
        records: The records, with their splits.
        leak: ``error``: raise on the first leak; ``warn``: log it.
        log: Where the warning goes.

    Returns:
        One message per leaking group (empty: no leak).

    Raises:
        DataError: ``leak`` is ``error`` and a group is on two sides; the message
            names two of its records (source, subject, split).
    """
    records = [r for r in records if r.split is not None]
    graph = _Graph(records, _study_by(SplitConfig(by="auto"), records))
    sides = {i: str(r.split) for i, r in enumerate(records)}
    how = dict.fromkeys(sides, "given")
    leaks = [
        found
        for groups in graph.groups().values()
        for group in groups
        if (found := _group_leak(group, graph, records, sides, how)) is not None
    ]
    _report(leaks, leak, log)
    return [found.message for found in leaks]


# --------------------------------------------------------------------------- making a split


def _round_half_up(fraction: float, n: int) -> int:
    # Decimal of the repr: 0.1 * 25 is 2.5 exactly, and rounds to 3.
    return math.floor(Decimal(repr(fraction)) * n + Decimal("0.5"))


def _allocate(n: int, test: float, validation: float) -> tuple[int, int]:
    n_test = min(_round_half_up(test, n), n)
    n_validation = min(_round_half_up(validation, n), n - n_test)
    return n_test, n_validation


def _category(value: Any) -> str:
    if isinstance(value, str):
        return value.strip().lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (list, tuple)):
        return "+".join(_category(v) for v in value)
    return str(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _strata(values: list[Any]) -> list[str]:
    """Each unit's stratum: its category, its quintile bin for numbers, ``missing``."""
    numbers = [v for v in values if _is_number(v)]
    edges: list[float] = []
    if len(set(numbers)) > _CATEGORY_LIMIT:
        import numpy as np

        edges = [
            float(e) for e in np.quantile(np.asarray(numbers, dtype=float), [0.2, 0.4, 0.6, 0.8])
        ]
    out = []
    for value in values:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            out.append("missing")
        elif edges and _is_number(value):
            out.append(f"quintile {1 + sum(value > e for e in edges)}")
        else:
            out.append(f"value {_category(value)}")
    return out


def _rng(seed: int, study: str, stratum: str) -> Any:
    import numpy as np

    # One stream per (study, stratum): adding a study, or subjects of one
    # stratum, leaves the other studies' and strata's draws as they were.
    digest = hashlib.sha256(f"{study}\0{stratum}".encode()).digest()
    words = [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)]
    return np.random.default_rng([seed % (1 << 64), *words])


def _make(
    study: str,
    groups: list[list[Key]],
    graph: _Graph,
    records: Sequence[StudyRecord],
    config: SplitConfig,
) -> list[str]:
    """The side of each of a study's groups (same order)."""
    if config.stratify:
        firsts = [
            records[
                min((i for key in g for i in graph.records_of[key]), key=graph.rank.__getitem__)
            ]
            for g in groups
        ]
        strata = _strata([r.phenotypes.get(config.stratify) for r in firsts])
    else:
        strata = ["all"] * len(groups)
    by_stratum: dict[str, list[int]] = {}
    for index, stratum in enumerate(strata):
        by_stratum.setdefault(stratum, []).append(index)
    plan = {
        s: list(_allocate(len(m), config.test, config.validation)) for s, m in by_stratum.items()
    }
    if sum(len(m) - sum(plan[s]) for s, m in by_stratum.items()) == 0 and groups:
        # Every study trains on something: give one held-out group back,
        # validation first (test is what the run reports).
        for side in (1, 0):
            given = next((s for s in sorted(plan, reverse=True) if plan[s][side]), None)
            if given is not None:
                plan[given][side] -= 1
                break
    sides = ["train"] * len(groups)
    for stratum in sorted(by_stratum):
        members = by_stratum[stratum]
        n_test, n_validation = plan[stratum]
        order = _rng(config.seed, study, stratum).permutation(len(members))
        for rank, position in enumerate(order):
            if rank < n_test:
                sides[members[position]] = "test"
            elif rank < n_test + n_validation:
                sides[members[position]] = "validation"
    return sides


@attrs.define
class _Decided:
    """What :func:`assign_splits` decides on the way, study by study.

    Attributes:
        sides: Each record's side, by its index in the records.
        how: How each record got it (a key of ``_HOW``), by the same index.
        made: Whether each subject's side was made here (not given or read).
        leaks: Records whose given split disagrees with the split file.
    """

    sides: dict[int, str] = attrs.field(factory=dict)
    how: dict[int, str] = attrs.field(factory=dict)
    made: dict[Key, bool] = attrs.field(factory=dict)
    leaks: list[_Leak] = attrs.field(factory=list)


def assign_splits(
    records: Iterable[StudyRecord], config: SplitConfig | None = None, *, log: Log = print
) -> tuple[list[StudyRecord], SplitTable]:
    """Give every record a side, keeping groups together (see the module docstring).

    Args:
        records: The records of every study, as read (``split`` None where not given).
        config: ``data.split``; default :class:`SplitConfig`.
        log: Receives the one-line summary and any leak warning.

    Returns:
        The records in the same order, each with its split, and the table of
        what was decided.

    Raises:
        DataError: a leak (with ``leak: error``), a subject missing from
            ``config.file``, or a malformed ``config.file``.
    """
    config = config or SplitConfig()
    records = list(records)
    graph = _Graph(records, _study_by(config, records))
    groups = graph.groups()
    given_file = SplitTable.read(config.file) if config.file else None
    file_sides = {row.key: row for row in given_file.rows} if given_file else {}
    giving = {r.study for r in records if r.split is not None}
    decided = _Decided()
    made_by: set[str] = set()
    for study, study_groups in sorted(groups.items()):
        if given_file is not None:
            _sides_from_file(decided, study, study_groups, graph, records, file_sides, config.file)
        elif study in giving:
            _sides_given(decided, study_groups, graph, records)
        else:
            made_by.add(graph.by[study])
            _sides_made(decided, study, study_groups, graph, records, config)
    for study_groups in groups.values():
        for group in study_groups:
            found = _group_leak(group, graph, records, decided.sides, decided.how)
            if found is not None:
                decided.leaks.append(found)
    _report(decided.leaks, config.leak, log)
    out = [
        record if record.split == decided.sides[i] else attrs.evolve(record, split=decided.sides[i])
        for i, record in enumerate(records)
    ]
    table = _split_table(graph, decided, made_by, config)
    log(table.describe())
    return out, table


def _sides_from_file(
    decided: _Decided,
    study: str,
    study_groups: list[list[Key]],
    graph: _Graph,
    records: Sequence[StudyRecord],
    file_sides: Mapping[Key, SplitRow],
    file: str,
) -> None:
    """Every subject of the study takes the split file's side; a given split disagreeing leaks."""
    for group in study_groups:
        for key in group:
            row = file_sides.get(key)
            if row is None:
                first = records[graph.records_of[key][0]]
                raise DataError(
                    f"{first.source or 'a record'}: subject {key[1]!r} of study "
                    f"{study!r} is not in the split file {file}; add it there, "
                    "or leave data.split.file empty to make a new split"
                )
            decided.made[key] = row.made
            for i in graph.records_of[key]:
                record = records[i]
                if record.split is not None and record.split != row.split:
                    decided.leaks.append(
                        _Leak(
                            f"split leak: {_describe(record, record.split, 'given')} "
                            f"disagrees with {row.where} ({row.split})"
                        )
                    )
                # A record naming several subjects takes its first subject's side;
                # the group check below reports subjects the file splits apart.
                if i not in decided.sides:
                    decided.sides[i] = record.split or row.split
                    decided.how[i] = "given" if record.split else "file"


def _sides_given(
    decided: _Decided,
    study_groups: list[list[Key]],
    graph: _Graph,
    records: Sequence[StudyRecord],
) -> None:
    """Every record of a study that gives splits keeps its own; those without one train."""
    for group in study_groups:
        for key in group:
            decided.made[key] = False
            for i in graph.records_of[key]:
                decided.sides[i] = records[i].split or "train"
                decided.how[i] = "given" if records[i].split else "default"


def _sides_made(
    decided: _Decided,
    study: str,
    study_groups: list[list[Key]],
    graph: _Graph,
    records: Sequence[StudyRecord],
    config: SplitConfig,
) -> None:
    """Every record of a study that gives no split takes the side made for its group."""
    for group, side in zip(
        study_groups, _make(study, study_groups, graph, records, config), strict=True
    ):
        for key in group:
            decided.made[key] = True
            for i in graph.records_of[key]:
                decided.sides[i] = side
                decided.how[i] = "made"


def _split_table(
    graph: _Graph, decided: _Decided, made_by: set[str], config: SplitConfig
) -> SplitTable:
    """The table of what was decided: one row per subject, sorted by key."""
    rows = [
        SplitRow(
            study=key[0],
            subject=key[1],
            family=graph.family.get(key),
            site=graph.site.get(key),
            split=decided.sides[graph.records_of[key][0]],
            made=decided.made[key],
        )
        for key in sorted(graph.records_of)
    ]
    return SplitTable(
        rows=rows,
        by="/".join(sorted(made_by)),
        seed=config.seed if made_by else None,
        file=config.file,
    )
