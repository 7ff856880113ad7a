"""Check studies before training: every problem at once, not the first one.

``umbrella validate PATH...`` reads each study through the installed study
readers (a manifest, a BrainVLM file, ``bids:...``, anything a plugin
recognises) and reports, per record:

* records the reader refuses (bad JSON line, missing field, no assistant turn,
  ``<image>`` placeholders that do not match the images). For the built-in
  manifest and BrainVLM readers each record is read on its own, so one bad line
  does not hide the others; a third-party reader stops at its first error,
  which is reported;
* modality names no installed plugin provides (``images[i].modality``);
* image files that are missing or unreadable (a folder without permission),
  do not decode, do not fit the modality, hold NaN/infinite values, are all
  zero after preprocessing (an empty or constant image carries no
  information), have a singular or non-finite affine, or an absurd voxel size
  (outside :data:`VOXEL_SIZE_RANGE`) (``images[i].path``);
* image paths outside the study's root (:func:`study_root`): absolute paths
  elsewhere, ``../`` out of it, symlinks pointing out, unless
  ``allow_outside_root`` (``data.allow_outside_root``) (``images[i].path``).

Images are checked by the modality's own loader at its **demo geometry**
(``ModalitySpec.for_demo``): decoding and the loader's checks (file count,
dimensions, value range) run in full, only the final resampling is to a small
grid, which keeps the check fast. Files shared by several records are decoded
once.

Each problem prints as ``SOURCE: FIELD: MESSAGE`` where SOURCE is
``FILE:LINE`` (JSONL), ``FILE: records[i]`` (JSON) or the study location;
:func:`validate_records` is the part training can call on records it already has.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from umbrella_core.data.brainvlm import BrainVLMStudy
from umbrella_core.data.dataset import load_image
from umbrella_core.data.manifest import find_manifest, read_manifest
from umbrella_core.errors import DataError, UmbrellaError
from umbrella_core.imaging import missing_file_message
from umbrella_core.types import IMAGE_PLACEHOLDER, ModalitySpec, StudyRecord

if TYPE_CHECKING:  # pragma: no cover
    from umbrella_core.plugins import PluginManager

__all__ = [
    "VOXEL_SIZE_RANGE",
    "Problem",
    "Report",
    "validate_records",
    "validate_locations",
    "read_study_tolerantly",
    "iter_study",
    "study_root",
    "outside_root_problems",
    "check_headers",
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


@attrs.frozen
class Report:
    """What :func:`validate_locations` found.

    Attributes:
        problems: Every problem, in study and record order.
        records: Records checked, those the reader refused included.
        images: Images listed by the records that could be read.
    """

    problems: tuple[Problem, ...]
    records: int
    images: int

    @property
    def bad_records(self) -> int:
        """Records with at least one problem."""
        return len({p.source for p in self.problems if p.field != STUDY_FIELD})

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        return (
            f"checked {self.records} records, {self.images} images: "
            f"{len(self.problems)} problems in {self.bad_records} records"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "records": self.records,
            "images": self.images,
            "problem_records": self.bad_records,
            "problems": [p.to_json() for p in self.problems],
        }


# ---------------------------------------------------------------------------
# Reader errors as problems
# ---------------------------------------------------------------------------

# "FILE:LINE: rest" (JSONL) or "FILE: records[i]: rest" (JSON), as the readers write them.
_SOURCE = re.compile(r"^(?P<source>.+?(?::\d+| records\[\d+\])): (?P<rest>.*)$", re.DOTALL)
# "images[1]: field 'path' ..." names a field inside a list item.
_ITEM = re.compile(r"^(?P<item>[\w.]+\[\d+\]): (?P<rest>.*)$", re.DOTALL)
_FIELD = re.compile(r"field '(?P<field>[^']+)'")


def problem_from_error(error: BaseException, source: str = "") -> Problem:
    """A Problem from a reader's or loader's error, splitting off where and which field.

    Args:
        error: The error; its message starts with ``FILE:LINE:`` or ``FILE: records[i]:``
            when a reader raised it.
        source: Where it happened, when the message does not say.
    """
    message = str(error)
    if source and message.startswith(source + ": "):
        rest = message[len(source) + 2 :]
    elif (match := _SOURCE.match(message)) is not None:
        source, rest = match["source"], match["rest"]
    else:
        rest = message
    item = ""
    if (match := _ITEM.match(rest)) is not None:
        item, rest = match["item"], match["rest"]
    if (match := _FIELD.search(rest)) is not None:
        field = f"{item}.{match['field']}" if item else match["field"]
    elif item:
        field = item
    elif "assistant turn" in rest or IMAGE_PLACEHOLDER in rest:
        field = "conversation"
    elif rest.startswith("invalid JSON"):
        field = "json"
    else:
        field = "record"
    return Problem(source=source, field=field, message=rest)


# ---------------------------------------------------------------------------
# Reading studies record by record
# ---------------------------------------------------------------------------


def _manifest_records(path: Path, on_error: Callable[[DataError], None]) -> Iterator[StudyRecord]:
    """The records of an UMBRELLA manifest, each bad line or record going to ``on_error``."""
    return read_manifest(path, on_error)


def iter_study(
    location: str,
    pm: PluginManager,
    options: Mapping[str, Any] | None,
    on_error: Callable[[DataError], None],
) -> Iterable[StudyRecord]:
    """The records of a study, each bad record of a built-in reader going to ``on_error``.

    The reader is chosen by ``pm.read_study``. The built-in manifest and
    BrainVLM readers go on after a bad line or record; a third-party reader's
    error (and any error about the whole study) propagates.
    """
    study = pm.read_study(location, dict(options or {}))
    if isinstance(study, BrainVLMStudy):
        return study.records(on_error)
    if getattr(study, "gi_code", None) is read_manifest.__code__:
        # The built-in manifest reader answered; its generator stops at the
        # first bad record: read the same file record by record instead.
        path = find_manifest(location)
        if path is not None:
            study.close()  # type: ignore[union-attr]
            return _manifest_records(path, on_error)
    return study


def read_study_tolerantly(
    location: str, pm: PluginManager, options: Mapping[str, Any] | None = None
) -> tuple[list[StudyRecord], list[Problem], int]:
    """Read a study as training would, collecting record errors instead of stopping.

    The reader is chosen by ``pm.read_study`` (so plugin precedence is the
    training run's); when it is a built-in reader, records are read one by one.

    Returns:
        ``(records, problems, refused)``: the usable records, the problems of the
        others and of the study itself, and how many records the reader refused.
    """
    problems: list[Problem] = []
    refused = 0

    def on_error(error: DataError) -> None:
        nonlocal refused
        refused += 1
        problems.append(problem_from_error(error))

    records: list[StudyRecord] = []
    try:
        for record in iter_study(location, pm, options, on_error):
            records.append(record)
    except UmbrellaError as error:
        problem = problem_from_error(error)
        if not problem.source:
            problem = Problem(location, STUDY_FIELD, problem.message)
        problems.append(problem)
    except Exception as error:  # a plugin's reader bug must not hide the other studies
        problems.append(Problem(location, STUDY_FIELD, f"{type(error).__name__}: {error}"))
    return records, problems, refused


# ---------------------------------------------------------------------------
# The dataset root
# ---------------------------------------------------------------------------


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


def outside_root_problems(record: StudyRecord, root: Path) -> list[Problem]:
    """A problem for each image file of ``record`` that lies outside ``root``.

    Paths are compared after resolving ``..`` and symlinks, so an absolute
    path elsewhere, a ``../`` path out of the root and a symlink pointing out
    are all caught.
    """
    source = record.source or f"subject {record.subject}"
    problems = []
    for i, image in enumerate(record.images):
        for path in image.paths:
            real = Path(os.path.realpath(path))
            if real != root and root not in real.parents:
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


# ---------------------------------------------------------------------------
# Checking records and images
# ---------------------------------------------------------------------------


def check_headers(spec: ModalitySpec, paths: Sequence[str]) -> list[str]:
    """What the NIfTI headers alone tell is wrong with one image (cheap: no voxel is decoded).

    Missing or unreadable files, files that are not NIfTI, singular or
    non-finite affines, a 3D file for a 4D modality, and a series with fewer
    frames than one window of a windowed modality. Decoding problems
    (truncated data, NaN, all-zero images) need :func:`validate_records`.
    """
    import nibabel as nib

    from umbrella_core.imaging.nifti import _check_affine

    messages = []
    for path in paths:
        if not os.path.isfile(path) or not os.access(path, os.R_OK):
            messages.append(missing_file_message(path))
            continue
        try:
            img = nib.load(path)
            shape = img.shape
            affine = img.affine
        except Exception as error:  # nibabel raises many kinds for what is not NIfTI
            reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
            messages.append(
                f"{path}: not a readable NIfTI file ({reason or type(error).__name__}); "
                "the file is truncated or corrupt: copy or re-export it"
            )
            continue
        try:
            _check_affine(path, affine)
        except DataError as error:
            messages.append(str(error))
        if spec.ndim == 4 and len(shape) < 4:
            messages.append(
                f"{path}: expected a 4D series for {spec.name}, got a {len(shape)}D image of "
                f"shape {shape}; give the {spec.name} series, not a single volume"
            )
    if not messages and spec.windowed and spec.frames is not None:
        try:
            frames = spec.frames(spec, tuple(paths))
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


def _check_image(spec: ModalitySpec, paths: tuple[str, ...]) -> list[str]:
    """What is wrong with one image (empty when nothing), each message naming the file."""
    import nibabel as nib
    import numpy as np

    missing = [p for p in paths if not os.path.isfile(p) or not os.access(p, os.R_OK)]
    if missing:
        return [missing_file_message(p) for p in missing]
    messages = []
    # How many files an image takes is the loader's business (a T1 and its
    # brain mask, a DWI series with .bval and .bvec): it refuses wrong counts.
    try:
        # The loader as training calls it, shape check included.
        array = load_image(spec, paths).numpy()
    except DataError as error:
        messages.append(str(error))
    except Exception as error:  # a loader bug is still a problem to report, not a crash
        messages.append(
            f"{', '.join(paths)}: the {spec.name} loader failed: {type(error).__name__}: {error}"
        )
    else:
        if not np.isfinite(array).all():
            messages.append(f"{', '.join(paths)}: NaN or infinite values after preprocessing")
        elif not array.any():
            messages.append(
                f"{', '.join(paths)}: all voxels are zero after preprocessing (an empty or "
                "constant image carries no information); re-export the file or remove the record"
            )
    low, high = VOXEL_SIZE_RANGE
    for path in paths:
        try:
            zooms = nib.load(path).header.get_zooms()[:3]
        except Exception:
            continue  # undecodable: the loader has said so
        if any(not low <= float(z) <= high for z in zooms):
            sizes = " x ".join(f"{float(z):g}" for z in zooms)
            messages.append(
                f"{path}: voxel size {sizes} mm is outside {low:g}-{high:g} mm; "
                "check the header's pixdim and units"
            )
    return messages


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

    Returns:
        The problems, in record order; empty when every record is usable.
    """
    from umbrella_core.data.manifest import check_record
    from umbrella_core.errors import PluginError

    found: list[tuple[int, int, Problem]] = []
    jobs: dict[tuple[str, tuple[str, ...]], list[tuple[int, str, int]]] = {}
    run_specs = dict(specs or {})
    specs = {}
    for index, record in enumerate(records):
        source = record.source or f"subject {record.subject}"
        try:
            check_record(record)
            if encode is not None:
                _encode_if_active(record, pm, run_specs, encode)
        except DataError as error:
            found.append((index, -1, problem_from_error(error, source)))
        for i, image in enumerate(record.images):
            try:
                spec = pm.resolve_modality(image.modality).item
            except PluginError as error:
                found.append((index, i, Problem(source, f"images[{i}].modality", str(error))))
                continue
            specs.setdefault(spec.name, run_specs.get(spec.name, spec).for_demo())
            jobs.setdefault((spec.name, image.paths), []).append((index, source, i))
    workers = workers or min(4, os.cpu_count() or 1)
    keys = list(jobs)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(lambda key: _check_image(specs[key[0]], key[1]), keys)
        for key, messages in zip(keys, results, strict=True):
            for index, source, i in jobs[key]:
                for message in messages:
                    found.append((index, i, Problem(source, f"images[{i}].path", message)))
    found.sort(key=lambda item: (item[0], item[1]))
    return [problem for _, _, problem in found]


def validate_locations(
    locations: Sequence[str | tuple[str, Mapping[str, Any]]],
    pm: PluginManager | None = None,
    *,
    workers: int | None = None,
    specs: Mapping[str, ModalitySpec] | None = None,
    allow_outside_root: bool = False,
    encode: Callable[[StudyRecord], Any] | None = None,
) -> Report:
    """Read and check every study; see the module docstring.

    Args:
        locations: Study locations, or ``(location, reader options)`` pairs
            (a config's ``data.studies``).
        pm: The plugin manager (the installed plugins when None).
        workers: Threads decoding images.
        specs: The run's modality specs, as for :func:`validate_records`.
        allow_outside_root: Accept image files outside each study's root
            (:func:`study_root`); otherwise they are problems and not opened.
    """
    from umbrella_core.data.split import check_leaks

    if pm is None:
        from umbrella_core.plugins import get_plugin_manager

        pm = get_plugin_manager()
    problems: list[Problem] = []
    n_records = n_images = 0
    for item in locations:
        location, options = (item, {}) if isinstance(item, str) else item
        records, read_problems, refused = read_study_tolerantly(location, pm, options)
        inside = records
        if not allow_outside_root:
            root = study_root(location)
            outside = {id(r): outside_root_problems(r, root) for r in records}
            read_problems += [p for r in records for p in outside[id(r)]]
            inside = [r for r in records if not outside[id(r)]]
        # A subject or family on two sides of the split the study gives (I10).
        read_problems += [
            Problem(location, "split", message)
            for message in check_leaks(records, leak="warn", log=lambda _: None)
        ]
        # Keep file order: a refused line 3 comes before a missing file on line 5.
        checked = validate_records(inside, pm, workers=workers, specs=specs, encode=encode)
        problems.extend(_in_source_order(read_problems + checked))
        n_records += len(records) + refused
        n_images += sum(len(r.images) for r in records)
    return Report(problems=tuple(problems), records=n_records, images=n_images)


def _in_source_order(problems: list[Problem]) -> list[Problem]:
    def key(problem: Problem) -> tuple[int, int]:
        number = re.search(r"(?::(\d+)$| records\[(\d+)\]$)", problem.source)
        if number is None:
            return (0, 0)
        return (1, int(number.group(1) or number.group(2)))

    return sorted(problems, key=key)  # stable: a record's own problems keep their order
