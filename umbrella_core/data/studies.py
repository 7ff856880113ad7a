"""Reading a run's studies: the active modalities, every study's records, their split, screening.

Everything between a configuration and the records a run trains on lives
here: :func:`resolve_specs` (the modalities, with the run's geometry and
preprocessing settings), :func:`read_studies` (each study through its reader,
inactive modalities counted, bad records kept as problems, every record given
its side of the split: :mod:`umbrella_core.data.split`) and
:func:`screen_records` (files and headers checked, conversations encoded,
before step 1). ``umbrella train``, ``umbrella validate --config``,
``umbrella evaluate`` and ``umbrella generate`` all read studies this way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs

from umbrella_core.config import RunConfig, StudyConfig
from umbrella_core.data.header_index import HeaderIndex
from umbrella_core.data.split import assign_splits
from umbrella_core.data.split_table import SplitTable
from umbrella_core.errors import ConfigError, DataError
from umbrella_core.plugins import PluginManager
from umbrella_core.types import ModalitySpec, StudyRecord

if TYPE_CHECKING:  # pragma: no cover
    from umbrella_core.data.checks import Problem

__all__ = [
    "StudyData",
    "configure_spec",
    "resolve_specs",
    "read_studies",
    "screen_records",
    "check_headers_once",
    "plugin_versions",
]


def configure_spec(spec: ModalitySpec, settings: Any) -> ModalitySpec:
    """``spec`` with ``data.preprocessing.<name>`` applied by its plugin's ``configure``."""
    if not settings:
        return spec
    key = f"data.preprocessing.{spec.name}"
    if not isinstance(settings, dict):
        raise ConfigError(f"{key}: expected a mapping of settings, got {settings!r}")
    if spec.configure is None:
        raise ConfigError(f"{key}: the {spec.name} plugin takes no preprocessing settings")
    try:
        configured = spec.configure(spec, dict(settings))
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{key}: {exc}") from None
    if not isinstance(configured, ModalitySpec) or configured.name != spec.name:
        raise ConfigError(
            f"{key}: the {spec.name} plugin's configure returned {configured!r}, "
            "not a ModalitySpec of that modality"
        )
    return configured


def resolve_specs(
    config: RunConfig, pm: PluginManager, *, demo: bool
) -> tuple[dict[str, ModalitySpec], dict[str, tuple[str, str, str]]]:
    """Active modalities in canonical (sorted) order, with the run's geometry."""
    names = config.data.modalities or tuple(pm.modality_registry())
    if not names:
        raise ConfigError("no modality plugin is installed: pip install umbrella-t1 (or another)")
    provided = {}
    for name in names:
        p = pm.resolve_modality(name)
        provided[p.item.name] = p
    specs: dict[str, ModalitySpec] = {}
    provenance: dict[str, tuple[str, str, str]] = {}
    for section in ("geometry", "preprocessing"):
        unknown = set(getattr(config.data, section)) - set(provided)
        if unknown:
            raise ConfigError(
                f"data.{section}: {sorted(unknown)[0]!r} is not an active modality "
                f"(active: {', '.join(sorted(provided))})"
            )
    for name in sorted(provided):
        spec = provided[name].item
        if demo:
            spec = spec.for_demo()
        override = config.data.geometry.get(name, {})
        bad = set(override) - {"shape", "patch_size", "window_stride"}
        if bad:
            raise ConfigError(
                f"data.geometry.{name}: unknown key {sorted(bad)[0]!r} "
                "(shape, patch_size, window_stride)"
            )
        try:
            spec = spec.with_geometry(override.get("shape"), override.get("patch_size"))
            if "window_stride" in override:
                if spec.windows is None:
                    raise ConfigError(
                        f"data.geometry.{name}.window_stride: {name} files give one input "
                        "each (the plugin declares no windows)"
                    )
                windows = attrs.evolve(spec.windows, stride=override["window_stride"])
                spec = attrs.evolve(spec, windows=windows)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"data.geometry.{name}: {exc}") from None
        spec = configure_spec(spec, config.data.preprocessing.get(name))
        specs[name] = spec
        provenance[name] = (
            provided[name].plugin,
            provided[name].distribution,
            provided[name].version,
        )
    return specs, provenance


def screen_records(
    per_study: list[list[StudyRecord]],
    *,
    check: str,
    encode: Callable[[StudyRecord], Any],
    pm: PluginManager,
    specs: dict[str, ModalitySpec] | None = None,
    index: Any = None,
    workers: int = 0,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    lengths: dict[tuple[Any, ...], int] | None = None,
) -> tuple[list[list[StudyRecord]], list[Any]]:
    """Split records into usable ones and problems, before step 1 (I6).

    ``check`` is ``files`` (every image file exists and its NIfTI header fits
    the modality: readable, a regular affine, 4D for a 4D modality, at least one
    window of a windowed one; every conversation encodes within the model's
    length) or ``full`` (also decode and preprocess every image, as ``umbrella
    validate`` does: truncated data, NaN, all-zero images) or ``none``
    (encoding only).

    ``index`` (a :class:`~umbrella_core.data.header_index.HeaderIndex`, since
    0.3) holds the outcome of earlier launches' checks: only new or changed
    files are opened, ``workers`` processes reading them (threads below 2),
    with a progress bar when ``progress``; the caller saves it. Records with
    the same conversation are encoded once; ``lengths``, given, receives each
    encoded conversation's length in tokens by ``(record.turns,
    record.modalities)`` (for ``data.batching: length``; since 0.3).
    """
    from umbrella_core.data.checks import Problem, problem_from_error, problems_by_record

    if index is None:
        index = HeaderIndex(None, {})
    problems: list[Problem] = []
    bad: set[int] = set()
    everything = [r for records in per_study for r in records]
    headers: dict[tuple[str, tuple[str, ...]], list[str]] = {}
    if check in ("files", "full"):
        keys = ((i.modality, i.paths) for r in everything for i in r.images)
        headers = index.check_images(
            keys, specs or {}, decode=False, workers=workers, progress=progress, log=log
        )
    # A cohort's records share few conversations (one question per phenotype,
    # answers from a short list): the template and tokenizer run once for each.
    encoded: dict[tuple[Any, ...], Any] = {}
    for record in everything:
        source = record.source or f"subject {record.subject}"
        for i, image in enumerate(record.images):
            for message in headers.get((image.modality, image.paths), ()):
                problems.append(Problem(source, f"images[{i}].path", message))
                bad.add(id(record))
        same = (record.turns, record.modalities)
        if same in encoded:
            continue
        try:
            encoded[same] = encode(record)
        except DataError as error:
            # Not kept: the next record's error must name that record.
            problems.append(problem_from_error(error, source))
            bad.add(id(record))
    if lengths is not None:
        lengths.update((same, len(e.input_ids)) for same, e in encoded.items())
    if check == "full":
        # By position, not by source: records may share one (the task
        # records of one scan, a plugin's rows of one clinical table).
        usable = [r for r in everything if id(r) not in bad]
        for position, problem in problems_by_record(usable, pm, specs=specs, index=index):
            problems.append(problem)
            bad.add(id(usable[position]))
    kept = [[r for r in records if id(r) not in bad] for records in per_study]
    return kept, problems


@attrs.define
class StudyData:
    """The records of a run's studies, with the active modalities they use."""

    specs: dict[str, ModalitySpec]
    provenance: dict[str, tuple[str, str, str]]
    studies: list[StudyConfig]
    per_study: list[list[StudyRecord]]
    skipped: dict[str, int]
    #: Records refused while reading (bad lines, unknown modalities, paths
    #: outside the dataset root), as ``validate.Problem`` values.
    problems: list[Any] = attrs.field(factory=list)
    #: The split of the records (ARCHITECTURE I10): what each subject's side
    #: is and whether it was made or given; a run writes it to split.tsv.
    split: SplitTable | None = None
    #: What earlier launches' checks found (``data.header_index``; since 0.3).
    header_index: Any = None

    @property
    def locations(self) -> list[str]:
        return [study.location for study in self.studies]

    @property
    def records(self) -> list[StudyRecord]:
        return [r for records in self.per_study for r in records]

    def versions(self) -> dict[str, str]:
        return plugin_versions(self.provenance)


def plugin_versions(provenance: dict[str, tuple[str, str, str]]) -> dict[str, str]:
    """Modality → ``distribution==version`` of its plugin, for cache keys."""
    return {n: f"{d}=={v}" for n, (_, d, v) in provenance.items()}


def read_studies(
    config: RunConfig, pm: PluginManager, *, log: Callable[[str], None] = print
) -> StudyData:
    """Resolve the active modalities and read every study's records (the demo without studies).

    Records of inactive modalities are counted in ``skipped``; images named by
    alias get their canonical modality name. Bad records (a bad JSON line, a
    missing field, a modality no plugin provides, an image outside the study's
    root unless ``data.allow_outside_root``) become ``problems``, which
    :func:`prepare` treats as ``data.on_bad`` says; an error about a whole
    study (unreadable, empty, not JSON) is raised. Files are checked later, by
    :func:`screen_records`. Every record then gets its split
    (:func:`umbrella_core.data.split.assign_splits`, ``data.split``): a leak of
    a subject or family across sides is raised as a DataError (unless
    ``data.split.leak`` is ``warn``), and what was decided is ``StudyData.split``.
    """
    demo = not config.data.studies
    specs, provenance = resolve_specs(config, pm, demo=demo)
    studies = _studies_to_read(config, specs, provenance, log=log)
    records, per_study, skipped, problems = _read_records(
        studies, specs, pm, check_root=not demo and not config.data.allow_outside_root
    )
    _refuse_no_records(records, problems, specs, [study.location for study in studies])
    warn_about_copies(records, log)
    # Every record gets a side here, groups kept together (data.split); the
    # demo's manifest names its own sides, so nothing is made for it.
    assigned, table = assign_splits(records, config.data.split, log=log)
    sides = {id(r): a for r, a in zip(records, assigned, strict=True)}
    per_study = [[sides[id(r)] for r in study_records] for study_records in per_study]
    index = HeaderIndex.for_setting(config.data.header_index, plugin_versions(provenance), log=log)
    return StudyData(
        specs, provenance, studies, per_study, skipped, problems, split=table, header_index=index
    )


def _studies_to_read(
    config: RunConfig,
    specs: dict[str, ModalitySpec],
    provenance: dict[str, tuple[str, str, str]],
    *,
    log: Callable[[str], None],
) -> list[StudyConfig]:
    """The run's studies, or the built-in demo's (written to the cache) when it names none."""
    from umbrella_core.data.demo import cached_demo

    if config.data.studies:
        return list(config.data.studies)
    log(
        "no --study given: using the built-in demo "
        f"({config.data.demo_subjects} subjects per modality)"
    )
    manifest = cached_demo(
        specs,
        plugin_versions(provenance),
        subjects=config.data.demo_subjects,
        seed=0,
        log=log,
    )
    return [StudyConfig(location=str(manifest))]


def _read_records(
    studies: list[StudyConfig],
    specs: dict[str, ModalitySpec],
    pm: PluginManager,
    *,
    check_root: bool,
) -> tuple[list[StudyRecord], list[list[StudyRecord]], dict[str, int], list[Problem]]:
    """Every study's records of the active modalities: ``(records, per_study, skipped, problems)``.

    Records outside their study's root (where ``check_root``) and records of
    modalities no plugin provides become problems; those of inactive
    modalities are counted in ``skipped`` by their modality key.
    """
    from umbrella_core.data.checks import (
        canonical_modalities,
        outside_root_problems,
        problem_from_error,
        study_root,
    )

    records: list[StudyRecord] = []
    per_study: list[list[StudyRecord]] = []
    skipped: dict[str, int] = {}
    problems: list[Problem] = []

    def refused(error: DataError) -> None:
        problems.append(problem_from_error(error))

    for study in studies:
        per_study.append([])
        root = study_root(study.location)
        folders: dict[str, str] = {}
        for record in pm.read_study(study.location, study.options, refused):
            if check_root:
                outside = outside_root_problems(record, root, folders)
                if outside:
                    problems.extend(outside)
                    continue
            inactive = [m for m in record.modalities if m not in specs]
            if inactive:
                # Modalities may be named by alias in a manifest; a name no
                # plugin provides is a bad record, not an inactive modality.
                canonical, unknown = canonical_modalities(record, pm)
                if canonical is None:
                    problems.extend(unknown)
                    continue
                if not all(m in specs for m in canonical.modalities):
                    skipped[record.modality_key] = skipped.get(record.modality_key, 0) + 1
                    continue
                record = canonical
            records.append(record)
            per_study[-1].append(record)
    return records, per_study, skipped, problems


def _refuse_no_records(
    records: list[StudyRecord],
    problems: list[Problem],
    specs: dict[str, ModalitySpec],
    locations: list[str],
) -> None:
    """Raise DataError when no record is left to train on, showing the first problems."""
    if not records and problems:
        shown = "\n  ".join(str(p) for p in problems[:5])
        more = f"\n  ... and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise DataError(
            f"{len(problems)} problem(s) in the data and no usable record; nothing was "
            f"trained:\n  {shown}{more}"
        )
    if not records:
        raise DataError(
            f"no record of the active modalities ({', '.join(specs)}) in {', '.join(locations)}"
        )


def check_headers_once(
    data: StudyData, config: RunConfig, *, log: Callable[[str], None] = print
) -> None:
    """Check every image's headers into the index, so that the next process only looks up.

    A distributed run calls it on the main process first: the other ranks
    then find every image indexed instead of each reading every header.
    """
    if config.data.check == "none" or data.header_index is None:
        return
    keys = ((i.modality, i.paths) for r in data.records for i in r.images)
    data.header_index.check_images(
        keys,
        data.specs,
        decode=False,
        workers=config.data.workers,
        progress=config.trainer.progress,
        log=log,
    )
    data.header_index.save()


def warn_about_copies(records: list[StudyRecord], log: Callable[[str], None]) -> None:
    """Say when records repeat exactly: each copy is one more draw of the same sample.

    200 copies of one record among 215 make it 93 % of the draws; a user who
    meant to weight a study has ``data.weights`` and study weights for that.
    """
    from collections import Counter

    def key(record: StudyRecord) -> tuple[Any, ...]:
        images = tuple((i.modality, i.paths) for i in record.images)
        turns = tuple((t.role, t.content) for t in record.turns)
        return (record.study, record.subject, record.session, images, turns)

    counts = Counter(key(r) for r in records)
    copies = sum(n - 1 for n in counts.values() if n > 1)
    if not copies:
        return
    top, n = counts.most_common(1)[0]
    first = next(r for r in records if key(r) == top)
    log(
        f"warning: {copies} record(s) repeat another exactly; the most repeated, "
        f"{first.source or first.subject}, appears {n} times ({n / len(records):.0%} of the "
        "records): remove the copies, or weight studies with data.weights / a study's weight"
    )
