"""Task templates: the conversations made from a scan and its subject's phenotypes.

A task turns one scan (or, for ``sex_comparison``, two scans of different
subjects) into a question and its answer:

=================  =============================================  ==========================
task               question                                       answer
=================  =============================================  ==========================
``sex``            What is the sex of this subject?               ``male`` / ``female``
``age``            How old is the subject?                        ``63 years`` (rounded half up)
``diagnosis``      What is the diagnosis of this subject?         ``autism``, ``control``, ...
``column:NAME``    What is the NAME of this subject?              the cell, as written
``sex_comparison`` <image> <image> / Are these two subjects of    ``yes`` / ``no``
                   the same sex?
=================  =============================================  ==========================

Options (``options`` of the study in the run configuration):

* ``tasks``: the task names; default: ``sex``, ``age``, ``diagnosis`` and
  ``sex_comparison`` wherever the study has the phenotype they need.
* ``split``: one split for every record; otherwise a ``split`` column of the
  phenotype table; otherwise none, and the core makes one (``data.split``)
  that keeps each subject, and each family, on one side.
* ``family_column``, ``site_column``: the phenotype columns holding a
  subject's family id and acquisition site, where the cohort's own are not
  known (ABCD ``rel_family_id``/``site_id_l``, HCP ``Family_ID``, ABIDE
  ``SITE_ID``, UK Biobank ``54-2.0``; HBN's site is its site folder).
* ``seed``: seeds the ``sex_comparison`` pairing (default 0).
* ``modalities``: only scans of these modalities.

``sex_comparison`` pairs each subject at most once per study, not per
modality: a pair gives one record for each modality both subjects have a scan
of (their first session and run), so a subject is never chained to several
others. Pairs are made within one split (when splits are given) and one site,
so that a pair never joins two sides or two sites (a family whose members
span sites or splits is paired where its first member is); subjects of
families with several members are paired within blocks of two families, so
that pairs and families together keep the groups the core splits by small.

A record whose phenotype is missing (no row, an empty cell, an unknown coding)
is skipped for that task and counted; :func:`last_stats` returns the counts of
the last read of each study.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from umbrella_core.data.manifest import check_record
from umbrella_core.errors import ConfigError, DataError
from umbrella_core.types import IMAGE_PLACEHOLDER, StudyRecord, Turn
from umbrella_studies.phenotypes import Conventions, common_phenotypes, family_and_site
from umbrella_studies.scans import Scan
from umbrella_studies.tables import PhenotypeTable, Row

__all__ = ["TASKS", "TaskStats", "last_stats", "make_records", "MergedTables", "Subject"]

#: The fixed task names; ``column:NAME`` works for any phenotype column besides.
TASKS = ("sex", "age", "diagnosis", "sex_comparison")

#: Tasks made by default, each when the study has the phenotype it needs.
_DEFAULT_NEEDS = {"sex": "sex", "age": "age", "diagnosis": "diagnosis", "sex_comparison": "sex"}

_SPLITS = ("train", "validation", "test")

#: The ``on_error`` callback of the ``umbrella_study_reader`` hook.
ErrorHandler = Callable[[DataError], None]

_STATS: dict[str, TaskStats] = {}


@attrs.define
class TaskStats:
    """Counts of one study read: records made and scans skipped, per task.

    Attributes:
        study: The study name.
        folder: The folder read.
        made: Records made per task.
        skipped: Scans skipped per task because the phenotype was missing.
        reasons: Per task, how many were skipped for which reason.
    """

    study: str
    folder: str
    made: Counter = attrs.field(factory=Counter)
    skipped: Counter = attrs.field(factory=Counter)
    reasons: dict[str, Counter] = attrs.field(factory=dict)

    def skip(self, task: str, reason: str) -> None:
        self.skipped[task] += 1
        self.reasons.setdefault(task, Counter())[reason] += 1


def last_stats(folder: str | None = None) -> dict[str, TaskStats]:
    """The counts of the last read of each study folder (or of ``folder`` only).

    Counts fill in as the records are consumed (readers are generators), so
    read them after the study has been read to the end.
    """
    if folder is None:
        return dict(_STATS)
    key = str(Path(folder).expanduser())
    return {key: _STATS[key]} if key in _STATS else {}


def _tables(tables: Iterable[Any]) -> tuple[Any, ...]:
    # A named converter: mypy's attrs plugin cannot type ``converter=tuple``.
    return tuple(tables)


@attrs.frozen
class MergedTables:
    """Several phenotype tables of one cohort looked up as one (HCP's unrestricted and
    restricted tables, ABCD's demographics and longitudinal-tracking tables).

    A subject's row is the union of its rows' columns, the earlier table's
    value winning where two have the same column; ``where`` is the first row's.
    """

    tables: tuple[Any, ...] = attrs.field(converter=_tables)

    @property
    def path(self) -> Any:
        return next((t.path for t in self.tables if t.path is not None), None)

    def lookup(self, subject: str, session: str | None) -> Row | None:
        rows = [row for t in self.tables if (row := t.lookup(subject, session)) is not None]
        if not rows:
            return None
        values: dict[str, Any] = {}
        for row in reversed(rows):
            values.update(row.values)
        return Row(values=values, where=rows[0].where)


@attrs.frozen
class Subject:
    """A scan with its phenotypes, split, family, site and the phenotype row's location."""

    scan: Scan
    phenotypes: dict[str, Any]
    split: str | None
    row: str | None
    family: str | None = None
    site: str | None = None


def _format(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _answer(task: str, phenotypes: Mapping[str, Any]) -> tuple[str, str] | str:
    """The question and answer of a one-scan task, or why it cannot be asked."""
    if task in ("sex", "age", "diagnosis"):
        if task not in phenotypes:
            return f"no {task} column"
        value = phenotypes[task]
        if value is None:
            return f"{task} missing or not coded"
        if task == "sex":
            return "What is the sex of this subject?", value
        if task == "age":
            return "How old is the subject?", f"{math.floor(value + 0.5)} years"
        return "What is the diagnosis of this subject?", value
    name = task[len("column:") :]
    if name not in phenotypes:
        return f"no {name} column"
    if phenotypes[name] is None:
        return f"{name} missing"
    return f"What is the {name} of this subject?", _format(phenotypes[name])


def _check_tasks(tasks: Any) -> list[str]:
    if isinstance(tasks, str):
        tasks = [tasks]
    if not isinstance(tasks, Sequence) or not all(isinstance(t, str) for t in tasks):
        raise ConfigError(f"tasks: expected a list of task names, got {tasks!r}")
    for task in tasks:
        if task not in TASKS and not (task.startswith("column:") and len(task) > 7):
            raise ConfigError(
                f"tasks: unknown task {task!r}; known: {', '.join(TASKS)}, column:NAME"
            )
    return list(tasks)


def _split(
    options: Mapping[str, Any], phenotypes: Mapping[str, Any], row: str | None
) -> str | None:
    value = options.get("split")
    where = "options: split"
    if value is None:
        value, where = phenotypes.get("split"), f"{row}: column 'split'"
    if value is None:
        return None  # the core makes the split, keeping subjects and families together
    split = str(value).strip().lower()
    if split not in _SPLITS:
        message = f"{where}: expected train, validation or test, got {value!r}"
        if options.get("split") is not None:
            raise ConfigError(message)  # the study's option: every record would be refused
        raise DataError(message, source=row or "", field="split")
    return split


def _record(
    *, study: str, subjects: list[Subject], question: str, answer: str, phenotypes: dict
) -> StudyRecord:
    placeholders = " ".join([IMAGE_PLACEHOLDER] * len(subjects))
    first = subjects[0]
    source = " + ".join(s.scan.source for s in subjects)
    if len(subjects) == 1 and first.row:
        source += f" ({first.row})"
    record = StudyRecord(
        subject="+".join(s.scan.subject for s in subjects),
        session=first.scan.session if len(subjects) == 1 else None,
        split=first.split,
        # Several subjects: their families and sites in subject order (StudyRecord).
        family=_joined([s.family for s in subjects]),
        site=_joined([s.site for s in subjects]),
        study=study,
        images=[s.scan.image for s in subjects],
        turns=[
            Turn(role="user", content=f"{placeholders}\n{question}"),
            Turn(role="assistant", content=answer),
        ],
        phenotypes=phenotypes,
        source=source,
    )
    check_record(record)
    return record


def _joined(values: list[str | None]) -> str | None:
    if all(v is None for v in values):
        return None
    return "+".join(v or "" for v in values)


def _pairs(subjects: list[Subject], rng: random.Random) -> list[tuple[Subject, Subject, bool]]:
    """Pairs of different subjects, alternately same- and different-sex while both are possible."""
    groups: dict[str, list[Subject]] = {"male": [], "female": []}
    for subject in subjects:
        groups[subject.phenotypes["sex"]].append(subject)
    for group in groups.values():
        rng.shuffle(group)
    males, females = groups["male"], groups["female"]
    pairs = []
    want_same = True
    while len(males) + len(females) >= 2:
        larger = males if len(males) >= len(females) else females
        can_same = len(larger) >= 2
        can_diff = bool(males) and bool(females)
        if (want_same and can_same) or not can_diff:
            pairs.append((larger.pop(), larger.pop(), True))
        else:
            pairs.append((males.pop(), females.pop(), False))
        want_same = not want_same
    return pairs


def make_records(
    *,
    study: str,
    folder: Path,
    scans: Iterable[Scan],
    table: PhenotypeTable,
    subject_key: Any,
    conventions: Conventions,
    options: Mapping[str, Any],
    site_of: Callable[[Scan], str | None] | None = None,
    on_error: ErrorHandler | None = None,
) -> Iterator[StudyRecord]:
    """The conversations of a study: every scan times every task, then the comparison pairs.

    Args:
        study: The study name records carry.
        folder: The study folder (named in errors and the stats key).
        scans: The study's images.
        table: Its phenotype table (possibly empty).
        subject_key: ``subject_key(scan.subject)`` is the table's key of a scan's subject.
        conventions: The cohort's sex/age/diagnosis columns and codings, and its
            family and site columns.
        options: The study's options (see the module docstring).
        site_of: A scan's site where the phenotype table names none (HBN: the
            site folder the scan is in).
        on_error: Receives the error of each scan whose phenotype row cannot
            be used (a bad ``split`` value), and reading goes on; without it
            the first one raises.

    Raises:
        DataError: no conversation could be made (the message names the folder and why),
            or (without ``on_error``) a bad ``split`` value in a row.
        ConfigError: an unknown task or option value.
    """
    conventions = conventions.with_options(options)
    wanted_modalities = options.get("modalities")
    if isinstance(wanted_modalities, str):
        wanted_modalities = [wanted_modalities]
    stats = TaskStats(study=study, folder=str(folder))
    _STATS[str(folder)] = stats
    subjects: list[Subject] = []
    for scan in scans:
        if wanted_modalities and scan.image.modality not in wanted_modalities:
            continue
        row = table.lookup(subject_key(scan.subject), scan.session)
        phenotypes = common_phenotypes(row.values if row else {}, conventions)
        try:
            split = _split(options, phenotypes, row.where if row else None)
        except DataError as error:
            if on_error is None:
                raise
            on_error(error)
            continue
        family, site = family_and_site(row.values if row else {}, conventions)
        if site is None and site_of is not None:
            site = site_of(scan)
        if scan.sidecar:
            phenotypes["_sidecar"] = dict(scan.sidecar)
        subjects.append(
            Subject(
                scan=scan,
                phenotypes=phenotypes,
                split=split,
                row=None if row is None else row.where,
                family=family,
                site=site,
            )
        )
    if not subjects:
        raise DataError(f"no conversation could be made: {folder}: no images found")
    if options.get("tasks") is None:
        present = set().union(*(s.phenotypes for s in subjects))
        tasks = [task for task, need in _DEFAULT_NEEDS.items() if need in present]
    else:
        tasks = _check_tasks(options["tasks"])
    if not tasks:
        found = (
            "no phenotype file" if table.path is None else f"no sex/age/diagnosis in {table.path}"
        )
        raise DataError(
            f"no conversation could be made: {folder}: {found}; give options "
            "tasks: [column:NAME] or a phenotype file"
        )
    made = 0
    for subject in subjects:
        for task in tasks:
            if task == "sex_comparison":
                continue
            asked = _answer(task, subject.phenotypes)
            if isinstance(asked, str):
                stats.skip(task, asked)
                continue
            question, answer = asked
            stats.made[task] += 1
            made += 1
            yield _record(
                study=study,
                subjects=[subject],
                question=question,
                answer=answer,
                phenotypes=subject.phenotypes,
            )
    if "sex_comparison" in tasks:
        made += yield from _comparisons(study, subjects, options, stats)
    if not made:
        reasons = "; ".join(
            f"{task}: {', '.join(f'{n} {why}' for why, n in counts.items())}"
            for task, counts in stats.reasons.items()
        )
        raise DataError(f"no conversation could be made: {folder}: {reasons or 'no task applies'}")


def _comparisons(
    study: str, subjects: list[Subject], options: Mapping[str, Any], stats: TaskStats
) -> Generator[StudyRecord, None, int]:
    seed = options.get("seed", 0)
    if not isinstance(seed, int):
        raise ConfigError(f"seed: expected an integer, got {seed!r}")
    # Each subject's first scan per modality (the first session and run); its
    # sex, split, site and family are those of its first scan (its family: the
    # first any scan names, as longitudinal tables name it at one event only).
    scans: dict[str, dict[str, Subject]] = {}
    families: dict[str, str] = {}
    for subject in subjects:
        if subject.phenotypes.get("sex") is None:
            stats.skip("sex_comparison", "sex missing or not coded")
            continue
        name = subject.scan.subject
        scans.setdefault(name, {}).setdefault(subject.scan.image.modality, subject)
        if subject.family is not None:
            families.setdefault(name, subject.family)
    # Pairs never cross a split (a pair is one unit of the split) or a site
    # (the core may split by site). A family is never cut between blocks, or
    # its members, paired in two blocks, would chain their partners together:
    # the block of a family is its first member's.
    blocks: dict[tuple[str, str], list[Subject]] = {}
    block_of: dict[str, tuple[str, str]] = {}
    for name in sorted(scans):
        first = next(iter(scans[name].values()))
        block = (first.split or "", first.site or "")
        if name in families:
            block = block_of.setdefault(families[name], block)
        blocks.setdefault(block, []).append(first)
    made = 0
    for (split, site), members in sorted(blocks.items()):
        rng = random.Random(f"{seed}:{split}:{site}")
        pairs = _block_pairs(members, families, rng)
        for _ in range(len(members) - 2 * len(pairs)):
            stats.skip("sex_comparison", "subject left unpaired")
        for a, b, same in pairs:
            common = sorted(set(scans[a.scan.subject]) & set(scans[b.scan.subject]))
            if not common:
                stats.skip("sex_comparison", "no modality in common with its pair")
            for modality in common:
                stats.made["sex_comparison"] += 1
                made += 1
                yield _record(
                    study=study,
                    subjects=[scans[a.scan.subject][modality], scans[b.scan.subject][modality]],
                    question="Are these two subjects of the same sex?",
                    answer="yes" if same else "no",
                    phenotypes={
                        "subjects": [a.scan.subject, b.scan.subject],
                        "sex": [a.phenotypes["sex"], b.phenotypes["sex"]],
                    },
                )
    return made


def _block_pairs(
    members: list[Subject], families: Mapping[str, str], rng: random.Random
) -> list[tuple[Subject, Subject, bool]]:
    """Each subject in at most one pair; a family of several is paired with at most one other.

    A pair joins its two subjects' groups when the core splits the records, and
    a family joins its members' groups: pairing freely across families would
    chain most of a cohort into one group. Subjects alone in their family (or
    without one) are paired among themselves, alternating same- and
    different-sex pairs; families of several members are shuffled and taken
    two at a time, their subjects paired within the two.
    """
    by_family: dict[str, list[Subject]] = {}
    for subject in members:
        name = subject.scan.subject
        by_family.setdefault(families.get(name, "\0" + name), []).append(subject)
    singles = [group[0] for key, group in sorted(by_family.items()) if len(group) == 1]
    several = [group for key, group in sorted(by_family.items()) if len(group) > 1]
    pairs = _pairs(singles, rng)
    rng.shuffle(several)
    for start in range(0, len(several), 2):
        pairs += _pairs([s for group in several[start : start + 2] for s in group], rng)
    return pairs
