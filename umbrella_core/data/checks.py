"""Checking study records before training: every problem at once, each naming where and what.

The checks ``umbrella validate`` runs and training runs before step 1
(``data.check``, :func:`umbrella_core.data.studies.screen_records`):

* :func:`read_study_tolerantly`: a study read through its reader, each
  record the reader refuses reported through the ``on_error`` callback of
  the ``umbrella_study_reader`` hook (a reader without it stops at its first
  bad record, which is reported);
* :func:`outside_root_problems`: image files outside the study's root
  (:func:`study_root`);
* :func:`canonical_modalities`: modality names no installed plugin provides;
* :func:`check_image`: one image as the run will see it: what its NIfTI
  headers alone tell (:func:`check_headers`, cheap: missing or unreadable
  files, wrong dimensions, voxel sizes, too few frames for one of the run's
  windows) and, with ``decode``, what decoding it by its modality's loader
  tells, at the demo geometry (``ModalitySpec.for_demo``: the loader's checks
  run in full, only the final resampling is to a small grid). Training
  (``data.check``), ``umbrella validate``, ``umbrella generate`` and
  ``umbrella cache build`` all judge images by it;
* :func:`problems_by_record` / :func:`validate_records`: structure, encoding and
  every image checked with :func:`check_image`; files shared by several
  records are checked once.

Each problem is a :class:`Problem`: ``SOURCE: FIELD: MESSAGE``, where SOURCE
is the record's ``source`` (``FILE:LINE``, ``FILE: records[i]``, a table row)
or the study location. Problems of records are tied to the records by
position, not by ``source``: several records may share one.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from umbrella_core.data.dataset import load_image
from umbrella_core.errors import DataError, UmbrellaError
from umbrella_core.types import ModalitySpec, StudyRecord

if TYPE_CHECKING:  # pragma: no cover
    from umbrella_core.plugins import PluginManager

__all__ = [
    "VOXEL_SIZE_RANGE",
    "check_image",
    "decoded_problems",
    "STUDY_FIELD",
    "Problem",
    "problem_from_error",
    "read_study_tolerantly",
    "study_root",
    "outside_root_problems",
    "canonical_modalities",
    "check_headers",
    "problems_by_record",
    "validate_records",
]

#: Voxel sizes (mm) outside this range are reported: no brain MRI has 20 mm
#: voxels, and below 0.05 mm the header almost certainly holds metres or an error.
VOXEL_SIZE_RANGE = (0.05, 20.0)

#: Study-level problems (the study cannot be read at all) carry this field.
STUDY_FIELD = "study"


@attrs.frozen
class Problem:
    """One thing wrong with a study.

    Attributes:
        source: Where: ``FILE:LINE``, ``FILE: records[i]`` or the study location.
        field: The field at fault (``images[0].path``, ``conversation``, ``study``).
        message: What is wrong; messages about image files name the file.
    """

    source: str
    field: str
    message: str

    def __str__(self) -> str:
        return ": ".join(part for part in (self.source, self.field, self.message) if part)

    def to_json(self) -> dict[str, str]:
        return attrs.asdict(self)


def problem_from_error(error: BaseException, source: str = "") -> Problem:
    """A Problem from a reader's, encoder's or loader's error.

    A :class:`DataError` that names its ``source`` gives source and field as
    they are; otherwise ``source`` (where the caller was) and the field
    ``record``.
    """
    if isinstance(error, DataError) and error.source:
        return Problem(error.source, error.field or "record", error.detail)
    message = str(error)
    if source and message.startswith(f"{source}: "):
        message = message[len(source) + 2 :]
    return Problem(source, getattr(error, "field", "") or "record", message)


def read_study_tolerantly(
    location: str, pm: PluginManager, options: Mapping[str, Any] | None = None
) -> tuple[list[StudyRecord], list[tuple[int, Problem]], int]:
    """Read a study as training would, collecting record errors instead of stopping.

    The reader is chosen by ``pm.read_study`` (so plugin precedence is the
    training run's); the records it refuses come through ``on_error``.

    Returns:
        ``(records, problems, refused)``: the usable records; the problems of
        the others, each with the number of records read before it (so they
        can be listed in file order beside the records' own problems; -1 for a
        problem with the whole study); and how many records the reader refused.
    """
    problems: list[tuple[int, Problem]] = []
    records: list[StudyRecord] = []
    refused = 0

    def on_error(error: DataError) -> None:
        nonlocal refused
        refused += 1
        problems.append((len(records), problem_from_error(error)))

    try:
        for record in pm.read_study(location, options, on_error):
            records.append(record)
    except UmbrellaError as error:
        problem = problem_from_error(error)
        if not problem.source:
            problem = Problem(location, STUDY_FIELD, problem.message)
        problems.append((-1, problem))
    except Exception as error:  # a plugin's reader bug must not hide the other studies
        problems.append((-1, Problem(location, STUDY_FIELD, f"{type(error).__name__}: {error}")))
    return records, problems, refused


def study_root(location: str) -> Path:
    """The folder a study's images must stay in: the study's own folder.

    That is the folder given as the location, or the folder holding the file
    given (a manifest, a BrainVLM file); a ``kind:`` prefix (``bids:``,
    ``brainvlm:``) is dropped first. Symlinks in it are resolved.
    """
    path = location
    kind, sep, rest = location.partition(":")
    if sep and kind.isidentifier() and len(kind) > 1:  # not a Windows drive letter
        path = rest
    root = Path(path).expanduser()
    if not root.is_dir():
        root = root.parent
    return Path(os.path.realpath(root))


def outside_root_problems(
    record: StudyRecord, root: Path, folders: dict[str, str] | None = None
) -> list[Problem]:
    """A problem for each image file of ``record`` that lies outside ``root``.

    Paths are compared after resolving ``..`` and symlinks, so an absolute
    path elsewhere, a ``../`` path out of the root and a symlink pointing out
    are all caught. ``folders`` (a dict the caller keeps over a study's
    records) holds the folders already resolved: a cohort's records share a
    few thousand folders, and resolving each file's whole path again was most
    of reading a 100,000-record study.
    """
    source = record.source or f"subject {record.subject}"
    problems = []
    inside = str(root).rstrip(os.sep) + os.sep
    for i, image in enumerate(record.images):
        for path in image.paths:
            real_path = _resolved(path, {} if folders is None else folders)
            if real_path != str(root) and not real_path.startswith(inside):
                real = Path(real_path)
                via = "" if str(real) == os.path.abspath(path) else f" (it resolves to {real})"
                problems.append(
                    Problem(
                        source,
                        f"images[{i}].path",
                        f"{path}: outside the dataset root {root}{via}; move the file under "
                        "the root, or set data.allow_outside_root=true if you trust this study",
                    )
                )
    return problems


def _resolved(path: str, folders: dict[str, str]) -> str:
    """``os.path.realpath(path)``, with each folder resolved once (one ``lstat`` a name)."""
    if ".." in path.split(os.sep):
        # realpath resolves a link before the "..": abspath would drop both.
        return os.path.realpath(path)
    folder, name = os.path.split(os.path.abspath(path))
    return (
        os.path.realpath(path)
        if os.path.islink(path)
        else os.path.join(_resolved_folder(folder, folders), name)
    )


def _resolved_folder(folder: str, folders: dict[str, str]) -> str:
    real = folders.get(folder)
    if real is None:
        parent, name = os.path.split(folder)
        if not name or os.path.islink(folder):
            real = os.path.realpath(folder)
        else:
            real = os.path.join(_resolved_folder(parent, folders), name)
        folders[folder] = real
    return real


# ---------------------------------------------------------------------------
# Checking records and images
# ---------------------------------------------------------------------------


def check_headers(spec: ModalitySpec, paths: Sequence[str]) -> list[str]:
    """What the NIfTI headers alone tell is wrong with one image (cheap: no voxel is decoded).

    Everything :func:`~umbrella_core.imaging.header.read_nifti_header` refuses
    (missing, unreadable or non-regular files, files that are not single-file
    NIfTI, NIfTI pairs, images that are not 3D or 4D, complex or RGB voxels,
    integer scaling that overflows float32, singular or non-finite affines,
    more voxels than the ceilings or than the file can hold), a 3D file for a
    4D modality, voxel sizes outside :data:`VOXEL_SIZE_RANGE`, and a series
    with fewer frames than one window of a windowed modality. Each file
    costs one ``stat`` and at most 544 (inflated) bytes read. Decoding
    problems (truncated gzip data, NaN, all-zero images) need
    :func:`check_image` with ``decode``.
    """
    from umbrella_core.imaging.header import read_nifti_header

    messages = []
    low, high = VOXEL_SIZE_RANGE
    for path in paths:
        try:
            header = read_nifti_header(path)
        except DataError as error:
            messages.append(str(error))
            continue
        shape = header.shape
        zooms = header.header.get_zooms()[:3]
        if any(not low <= float(z) <= high for z in zooms):
            sizes = " x ".join(f"{float(z):g}" for z in zooms)
            messages.append(
                f"{path}: voxel size {sizes} mm is outside {low:g}-{high:g} mm; "
                "check the header's pixdim and units"
            )
        if spec.ndim == 4 and len(shape) < 4:
            messages.append(
                f"{path}: expected a 4D series for {spec.name}, got a {len(shape)}D image of "
                f"shape {shape}; give the {spec.name} series, not a single volume"
            )
    if not messages and spec.windowed:
        assert spec.windows is not None  # windowed
        try:
            frames = spec.windows.frames(spec, tuple(paths))
        except DataError as error:
            messages.append(str(error))
        else:
            if spec.window_count(frames) == 0:
                messages.append(
                    f"{', '.join(paths)}: {frames} frames, fewer than the {spec.shape[-1]} of "
                    f"one {spec.name} window; use a longer series or a shorter window "
                    f"(data.geometry.{spec.name}.shape)"
                )
    return messages


def check_image(spec: ModalitySpec, paths: Sequence[str], *, decode: bool) -> list[str]:
    """What is wrong with one image as the run sees it (empty when nothing), each naming the file.

    ``spec`` is the run's (its geometry decides how many frames a window
    takes). The header checks (:func:`check_headers`) come first; with
    ``decode``, an image they pass is decoded and preprocessed by its
    modality's loader at the demo geometry: undecodable data, NaN or
    infinite values, all-zero images.
    """
    messages = check_headers(spec, tuple(paths))
    if messages or not decode:
        return messages
    # How many files an image takes is the loader's business (a T1 and its
    # brain mask, a DWI series with .bval and .bvec): it refuses wrong counts.
    try:
        # The loader as training calls it, shape check included.
        array = load_image(spec.for_demo(), tuple(paths)).numpy()
    except DataError as error:
        return [str(error)]
    except Exception as error:  # a loader bug is still a problem to report, not a crash
        failed = f"{type(error).__name__}: {error}"
        return [f"{', '.join(paths)}: the {spec.name} loader failed: {failed}"]
    return decoded_problems(paths, array)


def decoded_problems(paths: Sequence[str], array: Any) -> list[str]:
    """What is wrong with an image as its loader gave it: NaN or infinite values, all
    zeros. Training (``data.check: full``), validate, generate and serve judge alike."""
    import numpy as np

    array = np.asarray(array)
    if not np.isfinite(array).all():
        return [f"{', '.join(paths)}: NaN or infinite values after preprocessing"]
    if not array.any():
        return [
            f"{', '.join(paths)}: all voxels are zero after preprocessing (an empty or "
            "constant image carries no information); re-export the file or remove the record"
        ]
    return []


def canonical_modalities(
    record: StudyRecord, pm: PluginManager
) -> tuple[StudyRecord | None, list[Problem]]:
    """``record`` with each image's modality by its canonical name (manifests may use aliases).

    Returns ``(record, [])``, or ``(None, problems)`` naming each image whose
    modality no installed plugin provides.
    """
    from umbrella_core.errors import PluginError

    source = record.source or f"subject {record.subject}"
    names, problems = [], []
    for i, image in enumerate(record.images):
        try:
            names.append(pm.resolve_modality(image.modality).item.name)
        except PluginError as error:
            problems.append(Problem(source, f"images[{i}].modality", str(error)))
    if problems:
        return None, problems
    images = [attrs.evolve(i, modality=n) for i, n in zip(record.images, names, strict=True)]
    return attrs.evolve(record, images=images), []


def _encode_if_active(
    record: StudyRecord,
    pm: PluginManager,
    specs: Mapping[str, ModalitySpec],
    encode: Callable[[StudyRecord], Any],
) -> None:
    """Encode ``record`` as the run would, when the run trains all of its modalities."""
    canonical, unknown = canonical_modalities(record, pm)
    # An unknown modality is reported on its own; the run skips records of
    # inactive modalities, they are not bad.
    if canonical is not None and all(m in specs for m in canonical.modalities):
        encode(canonical)


def validate_records(
    records: Iterable[StudyRecord],
    pm: PluginManager,
    *,
    workers: int | None = None,
    specs: Mapping[str, ModalitySpec] | None = None,
    encode: Callable[[StudyRecord], Any] | None = None,
) -> list[Problem]:
    """The problems of :func:`problems_by_record`, in record order; empty when all are usable."""
    return [
        problem
        for _, problem in problems_by_record(
            records, pm, workers=workers, specs=specs, encode=encode
        )
    ]


def problems_by_record(
    records: Iterable[StudyRecord],
    pm: PluginManager,
    *,
    workers: int | None = None,
    specs: Mapping[str, ModalitySpec] | None = None,
    encode: Callable[[StudyRecord], Any] | None = None,
    index: Any = None,
) -> list[tuple[int, Problem]]:
    """Check records: structure, modality names and every image file.

    Args:
        records: Records as a study reader yields them.
        pm: The plugin manager whose modalities resolve the names and load the files.
        workers: Threads decoding images (default: up to 4).
        specs: The run's modality specs (with its preprocessing settings) by
            name; modalities not in it are checked as their plugin provides them.
        encode: The run's conversation encoder (its tokenizer, image token
            counts and ``model.max_length``); a record it refuses, a too long
            conversation for one, is a problem.
        index: A :class:`~umbrella_core.data.header_index.HeaderIndex`: images
            whose decoding an earlier check passed or refused are not decoded
            again (since 0.3).

    Returns:
        ``(index, problem)`` pairs in record order, ``index`` being the
        record's position in ``records``: records may share a ``source``.
    """
    from umbrella_core.data.manifest import check_record
    from umbrella_core.errors import PluginError

    found: list[tuple[int, int, Problem]] = []
    jobs: dict[tuple[str, tuple[str, ...]], list[tuple[int, str, int]]] = {}
    run_specs = dict(specs or {})
    specs = {}
    # Conversations that encoded: a cohort's records share few of them.
    encoded: set[tuple[Any, ...]] = set()
    for position, record in enumerate(records):
        source = record.source or f"subject {record.subject}"
        try:
            check_record(record)
            same = (record.turns, record.modalities)
            if encode is not None and same not in encoded:
                _encode_if_active(record, pm, run_specs, encode)
                encoded.add(same)
        except DataError as error:
            found.append((position, -1, problem_from_error(error, source)))
        for i, image in enumerate(record.images):
            try:
                spec = pm.resolve_modality(image.modality).item
            except PluginError as error:
                found.append((position, i, Problem(source, f"images[{i}].modality", str(error))))
                continue
            specs.setdefault(spec.name, run_specs.get(spec.name, spec))
            jobs.setdefault((spec.name, image.paths), []).append((position, source, i))
    workers = workers or min(4, os.cpu_count() or 1)
    keys = list(jobs)
    if index is not None:
        outcome = index.check_images(keys, specs, decode=True, workers=workers)
        results: Iterable[list[str]] = (outcome[key] for key in keys)
        pool = None
    else:
        pool = ThreadPoolExecutor(max_workers=workers)
        results = pool.map(lambda key: check_image(specs[key[0]], key[1], decode=True), keys)
    for key, messages in zip(keys, results, strict=True):
        for position, source, i in jobs[key]:
            for message in messages:
                found.append((position, i, Problem(source, f"images[{i}].path", message)))
    if pool is not None:
        pool.shutdown()
    found.sort(key=lambda item: (item[0], item[1]))
    return [(position, problem) for position, _, problem in found]
