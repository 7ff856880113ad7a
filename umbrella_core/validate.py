"""``umbrella validate``: check studies before training, every problem at once.

``umbrella validate PATH...`` reads each study through the installed study
readers (a manifest, a BrainVLM file, ``bids:...``, anything a plugin
recognises) and reports, per record:

* records the reader refuses (bad JSON line, missing field, no assistant turn,
  ``<image>`` placeholders that do not match the images), each through the
  reader's ``on_error`` callback, so one bad line does not hide the others;
* modality names no installed plugin provides (``images[i].modality``);
* image files that are missing or unreadable (a folder without permission),
  do not decode, do not fit the modality, hold NaN/infinite values, are all
  zero after preprocessing (an empty or constant image carries no
  information), have a singular or non-finite affine, or an absurd voxel size
  (outside :data:`~umbrella_core.data.checks.VOXEL_SIZE_RANGE`)
  (``images[i].path``);
* image paths outside the study's root: absolute paths elsewhere, ``../`` out
  of it, symlinks pointing out, unless ``allow_outside_root``
  (``data.allow_outside_root``) (``images[i].path``);
* a subject or family on two sides of the split the study gives (``split``).

The checks themselves live in :mod:`umbrella_core.data.checks`, which
training uses too; this module holds the command's report.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import attrs

from umbrella_core.data.checks import (
    STUDY_FIELD,
    Problem,
    canonical_modalities,
    outside_root_problems,
    problems_by_record,
    read_study_tolerantly,
    study_root,
)
from umbrella_core.data.studies import warn_about_copies
from umbrella_core.errors import ConfigError
from umbrella_core.types import ModalitySpec, StudyRecord

if TYPE_CHECKING:  # pragma: no cover
    from umbrella_core.plugins import PluginManager

__all__ = ["Report", "distinct_problems", "validate_locations"]


@attrs.frozen
class Report:
    """What :func:`validate_locations` found.

    Attributes:
        problems: Every problem, in study and record order.
        records: Records checked, those the reader refused included.
        images: Images listed by the records that could be read.
        bad_records: Records with at least one problem (counted as records,
            not sources: records may share a source).
        inactive: Records left out as training leaves them out, by the
            modalities they use (``"dmri"``, ``"fmri+t1"``): modalities
            installed but not among the run's ``data.modalities``.
    """

    problems: tuple[Problem, ...]
    records: int
    images: int
    bad_records: int
    inactive: dict[str, int] = attrs.field(factory=dict)
    #: What is not wrong but would surprise (records repeated exactly), as training says it.
    warnings: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        line = (
            f"checked {_count(self.records, 'record')}, {_count(self.images, 'image')}: "
            f"{_count(len(self.problems), 'problem')} in {_count(self.bad_records, 'record')}"
        )
        if self.inactive:
            left = ", ".join(f"{n} {key}" for key, n in sorted(self.inactive.items()))
            line += (
                f"; left out as training leaves them out ({left}): "
                "modalities not in data.modalities"
            )
        return line

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "records": self.records,
            "images": self.images,
            "problem_records": self.bad_records,
            "inactive_records": dict(self.inactive),
            "problems": [p.to_json() for p in self.problems],
            "warnings": list(self.warnings),
        }


def distinct_problems(problems: Sequence[Problem]) -> list[tuple[Problem, int]]:
    """Each problem once, in order, with how many records have it: the questions of one
    scan share its source, and a bad file is one problem however many ask about it."""
    counts: dict[Problem, int] = {}
    for problem in problems:
        counts[problem] = counts.get(problem, 0) + 1
    return list(counts.items())


def validate_locations(
    locations: Sequence[str | tuple[str, Mapping[str, Any]]],
    pm: PluginManager | None = None,
    *,
    workers: int | None = None,
    specs: Mapping[str, ModalitySpec] | None = None,
    allow_outside_root: bool = False,
    encode: Callable[[StudyRecord], Any] | None = None,
    index: Any = None,
    augment: Callable[[list[StudyRecord]], Any] | None = None,
) -> Report:
    """Read and check every study; see the module docstring.

    Args:
        locations: Study locations, or ``(location, reader options)`` pairs
            (a config's ``data.studies``).
        pm: The plugin manager (the installed plugins when None).
        workers: Threads decoding images.
        specs: The run's modality specs, as for :func:`validate_records`;
            given, records of other modalities are left out (counted in
            ``Report.inactive``), as training leaves them out, and studies
            with no record of these modalities at all are a problem.
        allow_outside_root: Accept image files outside each study's root
            (:func:`study_root`); otherwise they are problems and not opened.
        index: A :class:`~umbrella_core.data.header_index.HeaderIndex`: images
            an earlier check decoded are not decoded again, and those decoded
            now are added to it (the caller saves it). Since 0.3.
        augment: The run's augmentation judge (``run_pipelines`` with its
            settings), given the records training could augment (those no study
            holds out): a transform that would change an answer is a problem,
            as it stops ``umbrella train``.
    """
    if pm is None:
        from umbrella_core.plugins import get_plugin_manager

        pm = get_plugin_manager()
    problems: list[Problem] = []
    n_records = n_images = n_bad = 0
    inactive: dict[str, int] = {}
    everything: list[StudyRecord] = []
    for item in locations:
        location, options = (item, {}) if isinstance(item, str) else item
        records, located, refused = read_study_tolerantly(location, pm, options)
        n_records += len(records) + refused
        if specs is not None:
            records = _active(records, pm, specs, inactive)
        everything += records
        # (records read before it, 0 for the reader's own report or 1 for a check, problem):
        # sorted, a refused line 3 comes before a missing file on line 5.
        found = _study_problems(location, records, located)
        found += _record_problems(
            location,
            records,
            pm,
            workers=workers,
            specs=specs,
            allow_outside_root=allow_outside_root,
            encode=encode,
            index=index,
        )
        # Each reader report is a record of its own; checks count by record.
        n_bad += len(located) - sum(position < 0 for position, _ in located)
        n_bad += len({position for position, phase, _ in found if phase == 1})
        found.sort(key=lambda entry: entry[:2])  # stable: a record's problems keep their order
        problems.extend(problem for _, _, problem in found)
        n_images += sum(len(r.images) for r in records)
    if specs is not None and inactive and n_images == 0 and not problems:
        # Training would stop here: nothing of its modalities to train on.
        problems.append(_no_active_record(", ".join(map(_location, locations)), specs))
    problems += _augmentation_problems(augment, everything)
    warnings: list[str] = []
    warn_about_copies(everything, warnings.append)
    return Report(
        problems=tuple(problems),
        records=n_records,
        images=n_images,
        bad_records=n_bad,
        inactive=inactive,
        warnings=tuple(warnings),
    )


def _augmentation_problems(
    augment: Callable[[list[StudyRecord]], Any] | None, records: list[StudyRecord]
) -> list[Problem]:
    """What the run's augmentation would stop training on, judged on the records training
    could augment (those no study holds out)."""
    if augment is None:
        return []
    try:
        augment([r for r in records if r.split in (None, "train")])
    except ConfigError as error:  # what train would stop on before step 1
        return [Problem("", "", str(error))]
    return []


def _study_problems(
    location: str, records: list[StudyRecord], located: list[tuple[int, Problem]]
) -> list[tuple[int, int, Problem]]:
    """The reader's own problems and the split's leaks, as ``(record, 0, problem)``."""
    from umbrella_core.data.split import check_leaks

    found = [(position, 0, problem) for position, problem in located]
    # A subject or family on two sides of the split the study gives (I10).
    found += [
        (-1, 0, Problem(location, "split", message))
        for message in check_leaks(records, leak="warn", log=lambda _: None)
    ]
    return found


def _record_problems(
    location: str,
    records: list[StudyRecord],
    pm: PluginManager,
    *,
    workers: int | None,
    specs: Mapping[str, ModalitySpec] | None,
    allow_outside_root: bool,
    encode: Callable[[StudyRecord], Any] | None,
    index: Any,
) -> list[tuple[int, int, Problem]]:
    """The checks' problems of one study's records, as ``(record, 1, problem)``.

    Images outside the study's root are problems of their own, and their
    records are not decoded (unless ``allow_outside_root``).
    """
    found: list[tuple[int, int, Problem]] = []
    inside = list(range(len(records)))
    if not allow_outside_root:
        root = study_root(location)
        folders: dict[str, str] = {}
        outside = [outside_root_problems(r, root, folders) for r in records]
        found += [(i, 1, p) for i, ps in enumerate(outside) for p in ps]
        inside = [i for i in inside if not outside[i]]
    checked = problems_by_record(
        [records[i] for i in inside],
        pm,
        workers=workers,
        specs=specs,
        encode=encode,
        index=index,
    )
    found += [(inside[i], 1, problem) for i, problem in checked]
    return found


def _active(
    records: list[StudyRecord],
    pm: PluginManager,
    specs: Mapping[str, ModalitySpec],
    inactive: dict[str, int],
) -> list[StudyRecord]:
    """The records training keeps: those of the run's modalities (or of unknown ones, reported)."""
    kept = []
    for record in records:
        canonical, _ = canonical_modalities(record, pm)
        if canonical is not None and not all(m in specs for m in canonical.modalities):
            inactive[canonical.modality_key] = inactive.get(canonical.modality_key, 0) + 1
            continue
        kept.append(record)
    return kept


def _location(item: str | tuple[str, Mapping[str, Any]]) -> str:
    return item if isinstance(item, str) else item[0]


def _no_active_record(locations: str, specs: Mapping[str, ModalitySpec]) -> Problem:
    return Problem(
        locations,
        STUDY_FIELD,
        f"no record of the run's modalities ({', '.join(specs)}): training would have "
        "nothing to train on; check data.modalities",
    )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")
