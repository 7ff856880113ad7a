"""From a 4D BOLD NIfTI series to a model input.

Every entry point (:func:`load_bold`, :func:`bold_series`, and the
header-only :func:`bold_frames` that the checks before training call) first
reads the repetition time (:func:`repetition_time`) and refuses one over
:data:`MAX_TR`: the usual cause is milliseconds labelled as seconds, and
resampling such a series to a ``target_tr`` would multiply its frames by a
thousand. Resampling in time is bounded too (:data:`MAX_TIME_GROWTH`, and the
core's voxel ceiling on the result).

A series is prepared (resampled in time and space, :func:`prepare_series`)
then normalised with its :func:`statistics` (:func:`normalise`); preparing
some of its frames reads only the frames of the file they are made from and
gives the values the whole series has there, which is how
:mod:`umbrella_fmri.window` reads a window alone.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np

from umbrella_core import DataError, ModalitySpec
from umbrella_core.imaging import (
    as_paths,
    load_nifti,
    read_frames,
    read_nifti_header,
    resize,
    voxel_ceilings,
    zscore_time,
)

__all__ = [
    "load_bold",
    "bold_series",
    "bold_frames",
    "prepare_series",
    "statistics",
    "normalise",
    "repetition_time",
    "sidecar_of",
    "BACKGROUND_FRACTION",
    "CHUNK",
    "MAX_TR",
    "MAX_TIME_GROWTH",
]

#: Voxels whose mean over the window is below this fraction of the 98th
#: percentile of voxel means are background (air, outside the head).
BACKGROUND_FRACTION = 0.2

#: Longest repetition time, in seconds, taken as real (sparse-sampling designs
#: reach about 10 s). A longer one is almost always milliseconds labelled as
#: seconds: nibabel's own ``example4d.nii.gz`` says 2000 s. The setting
#: ``data.preprocessing.fmri.max_tr`` changes it.
MAX_TR = 20.0

#: Most times as many frames as it has that a series may become when resampled
#: to ``target_tr``: 8 covers a 3 s cohort resampled to 0.4 s; more means a
#: wrong repetition time, and would multiply the memory of the series.
MAX_TIME_GROWTH = 8


def load_bold(
    spec: ModalitySpec,
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    max_tr: float | None = None,
) -> np.ndarray:
    """Load a window of a BOLD series as a ``(1, x, y, z, T)`` float32 array.

    ``(x, y, z, T)`` is ``spec.shape``. Steps: read and reorient the spatial
    axes to RAS (time stays last); take the first ``T`` frames (a fixed window,
    so the same file always gives the same input; series that begin with
    non-steady-state dummy scans should have them removed beforehand, as
    fMRIPrep and most scanners do); resample the spatial axes only to
    ``(x, y, z)`` with trilinear interpolation; z-score every voxel over the
    window (constant voxels become 0); set background voxels to 0.

    Background voxels are those whose mean over the window is below
    :data:`BACKGROUND_FRACTION` of the 98th percentile of voxel means, the
    mean-EPI threshold that brain-masking tools start from. Z-scoring would
    otherwise turn the noise in the air around the head into unit-variance
    time courses as strong as the brain's, which a model learns to memorise.

    Args:
        spec: The ``fmri`` modality with the configured shape.
        paths: One file (a path, or a sequence holding one path).
        max_tr: Longest plausible repetition time in seconds (None:
            :data:`MAX_TR`).

    Raises:
        DataError: Not exactly one file, an unreadable file, a repetition
            time over ``max_tr`` (or a sidecar that is not JSON), a 3D volume
            instead of a series, or a series shorter than ``T`` frames. The
            message names the file.
    """
    # mypy: _one_series (as_paths) takes path-like items too; its annotation says str.
    path = _one_series(spec, paths)  # type: ignore[arg-type]
    frames = spec.shape[3]
    repetition_time(path, max_tr=MAX_TR if max_tr is None else max_tr)
    data, _ = load_nifti(path)
    if data.ndim == 3:
        raise DataError(
            f"{path}: expected a 4D series (x, y, z, time), got a 3D volume of shape "
            f"{data.shape}; give the BOLD series, not a single volume"
        )
    if data.ndim != 4:
        raise DataError(f"{path}: expected a 4D series (x, y, z, time), got shape {data.shape}")
    if data.shape[3] < frames:
        raise DataError(
            f"{path}: the series has {data.shape[3]} frames, fewer than the {frames} frames "
            f"of one model input; use a longer series or a shorter window (shape {spec.shape})"
        )
    window = resize(data[..., :frames], spec.shape[:3])
    mean = window.mean(axis=-1)
    background = mean < BACKGROUND_FRACTION * np.percentile(mean, 98)
    series = zscore_time(window)
    series[background] = 0.0
    return series[np.newaxis]


def _one_series(spec: ModalitySpec, paths: str | os.PathLike[str] | Sequence[str]) -> str:
    files = as_paths(paths)
    if len(files) != 1:
        raise DataError(
            f"{spec.name} takes one 4D file per image, got {len(files)}: "
            f"{', '.join(files) or 'none'}"
        )
    return files[0]


def sidecar_of(path: str | os.PathLike[str]) -> str:
    """The BIDS JSON sidecar's name for an image: ``sub-01_bold.nii.gz`` -> ``sub-01_bold.json``."""
    name = os.fspath(path)
    stem = name[: -len(".nii.gz")] if name.endswith(".nii.gz") else os.path.splitext(name)[0]
    return stem + ".json"


def repetition_time(path: str | os.PathLike[str], *, max_tr: float | None = MAX_TR) -> float | None:
    """The repetition time in seconds: the BIDS sidecar's ``RepetitionTime``, else the header.

    The sidecar is the ``.json`` file with the image's name; the header's
    ``pixdim[4]`` is converted from its time unit (ms and us are common in the
    wild). None when neither gives a positive value. Only the header is read
    (:func:`~umbrella_core.imaging.read_nifti_header`), never a voxel.

    Args:
        path: The series.
        max_tr: Longest plausible repetition time in seconds; None accepts any.

    Raises:
        DataError: The sidecar exists but is not valid JSON, the image's
            header is unusable, or the repetition time is over ``max_tr``
            (milliseconds labelled as seconds). Names the file and what to do.
    """
    import json

    name = os.fspath(path)
    sidecar = sidecar_of(name)
    if os.path.isfile(sidecar):
        try:
            with open(sidecar, encoding="utf-8") as handle:
                value = json.load(handle).get("RepetitionTime")
        except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
            raise DataError(
                f"{sidecar}: not a valid JSON sidecar ({error}); fix or remove it"
            ) from None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            if max_tr is not None and value > max_tr:
                raise DataError(
                    f"{sidecar}: RepetitionTime is {value:g}, over the {max_tr:g} s a BOLD "
                    "frame can take; BIDS gives it in seconds, so this is probably "
                    "milliseconds: write it in seconds, or raise "
                    "data.preprocessing.fmri.max_tr if it is real"
                )
            return float(value)
    header = read_nifti_header(name).header
    zooms = header.get_zooms()
    if len(zooms) < 4 or not zooms[3] > 0:
        return None
    unit = header.get_xyzt_units()[1]
    tr = float(zooms[3]) * {"msec": 1e-3, "usec": 1e-6}.get(unit, 1.0)
    if max_tr is not None and tr > max_tr:
        stated = "no time unit, read as seconds" if unit == "unknown" else f"time unit {unit}"
        raise DataError(
            f"{name}: the header's repetition time is {tr:g} s (pixdim[4] {float(zooms[3]):g}, "
            f"{stated}), over the {max_tr:g} s a BOLD frame can take: probably milliseconds "
            "labelled as seconds; fix the header (pixdim[4] in seconds, or xyzt_units in msec), "
            f"or give the TR in seconds in the JSON sidecar {os.path.basename(sidecar)} "
            '("RepetitionTime"), or raise data.preprocessing.fmri.max_tr if it is real'
        )
    return tr


def _resampled_frames(frames: int, tr: float, target_tr: float) -> int:
    return int(np.floor((frames - 1) * tr / target_tr + 1e-9)) + 1


def _resampled_count(path: str, shape: Sequence[int], tr: float, target_tr: float) -> int:
    """Frames of the ``shape`` series of ``path`` resampled from ``tr`` to ``target_tr`` seconds.

    Raises:
        DataError: It would grow more than :data:`MAX_TIME_GROWTH` times, or
            past the core's voxel ceiling for one image.
    """
    frames = int(shape[-1])
    count = _resampled_frames(frames, tr, target_tr)
    if count > MAX_TIME_GROWTH * frames:
        raise DataError(
            f"{path}: resampling from TR {tr:g} s to target_tr {target_tr:g} s would turn "
            f"{frames} frames into {count:,}, more than {MAX_TIME_GROWTH}x as many; check the "
            "repetition time (header or JSON sidecar), or set data.preprocessing.fmri.target_tr "
            "closer to it"
        )
    voxels = math.prod(int(s) for s in shape[:-1]) * count
    ceiling = voxel_ceilings()[1]
    if voxels > ceiling:
        raise DataError(
            f"{path}: resampling from TR {tr:g} s to target_tr {target_tr:g} s would make "
            f"{count:,} frames ({voxels:,} voxels), over the ceiling of {ceiling:,}; set "
            "data.preprocessing.fmri.target_tr closer to the series' TR, or raise "
            "UMBRELLA_MAX_VOXELS if the memory is there"
        )
    return count


#: Frames resampled in space per call. Both the whole series and a window read
#: alone are resized in the same runs of frames (multiples of this from frame 0):
#: the resampler vectorises across frames, so a run of another length could round
#: a frame differently, and a window would then not be exactly its series' frames.
#: Eight frames per call is also about three times faster than all at once
#: (the output stays in cache).
CHUNK = 8


def _time_plan(
    path: str, shape: Sequence[int], tr: float, target_tr: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(low, high, weight)`` per resampled frame: linear interpolation from ``tr`` to
    ``target_tr`` seconds of frames ``low`` and ``high`` (bounded, see
    :func:`_resampled_count`)."""
    count = _resampled_count(path, shape, tr, target_tr)
    frames = int(shape[-1])
    position = np.arange(count) * (target_tr / tr)
    low = np.minimum(np.floor(position).astype(np.int64), frames - 1)
    high = np.minimum(low + 1, frames - 1)
    return low, high, (position - low).astype(np.float32)


def _source_frames(plan: tuple[np.ndarray, ...] | None, start: int, stop: int) -> tuple[int, int]:
    """The frames of the file that resampled frames ``start ... stop - 1`` are made from."""
    if plan is None:
        return start, stop
    low, high, _ = plan
    return int(low[start]), int(high[stop - 1]) + 1


def _prepared(
    data: np.ndarray,
    first: int,
    plan: tuple[np.ndarray, ...] | None,
    start: int,
    stop: int,
    shape: Sequence[int],
) -> np.ndarray:
    """Frames ``start ... stop - 1`` resampled in time (``plan``) and space, ``(*shape, n)``.

    ``data`` holds the file's frames from ``first`` on (:func:`_source_frames`);
    ``start`` is a multiple of :data:`CHUNK`, ``stop`` one too or the series' end.
    """
    out = np.empty((*shape, stop - start), dtype=np.float32)
    for a in range(start, stop, CHUNK):
        b = min(a + CHUNK, stop)
        if plan is None:
            chunk = data[..., a - first : b - first]
        else:
            low, high, weight = (part[a:b] for part in plan)
            chunk = data[..., low - first] * (1.0 - weight) + data[..., high - first] * weight
        out[..., a - start : b - start] = resize(chunk, shape)
    return out


def statistics(prepared: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """The per-voxel statistics of a whole prepared series: ``(3, x, y, z)`` float32.

    Planes: the mean over all frames, the factor of the z-score (1 / standard
    deviation; 0 for constant voxels, as :func:`~umbrella_core.imaging.zscore_time`
    gives them) and the background (1 where the mean is below
    :data:`BACKGROUND_FRACTION` of the 98th percentile of means). The same
    arithmetic as ``zscore_time``, so :func:`normalise` gives its values.
    """
    mean = prepared.mean(axis=-1)
    background = mean < BACKGROUND_FRACTION * np.percentile(mean, 98)
    centred = prepared - mean[..., np.newaxis]
    np.multiply(centred, centred, out=centred)  # in place: a series is gigabytes at 0.7 s TR
    std = np.sqrt(np.mean(centred, axis=-1))
    del centred
    constant = std <= eps
    scale = np.where(constant, np.float32(0.0), 1.0 / np.where(constant, 1.0, std))
    return np.stack([mean, scale.astype(np.float32), background.astype(np.float32)])


def normalise(frames: np.ndarray, stats: np.ndarray) -> np.ndarray:
    """Prepared frames z-scored with a series' :func:`statistics`, background set to 0."""
    mean, scale, background = stats
    out = np.subtract(frames, mean[..., np.newaxis], dtype=np.float32)
    np.multiply(out, scale[..., np.newaxis], out=out)  # in place: one array, not three
    out[background != 0] = 0.0
    return out


def prepare_series(
    spec: ModalitySpec,
    path: str,
    *,
    target_tr: float | None,
    max_tr: float | None,
    start: int | None = None,
    stop: int | None = None,
    index_dir: str | os.PathLike[str] | None = None,
) -> np.ndarray:
    """Frames ``start ... stop - 1`` of the series resampled in time and space, not normalised.

    ``(x, y, z, n)`` float32; the whole series when ``start`` is None. Only the
    file's frames they are made from are read (:func:`~umbrella_core.imaging.read_frames`,
    gzip indexes in ``index_dir``), and the values are those of the same
    frames of the whole series: the time plan is the whole series', and space
    is resampled in the same runs of :data:`CHUNK` frames.

    Raises:
        DataError: As :func:`bold_frames`, and what ``read_frames`` refuses;
            a series shorter than one window. Names the file.
    """
    tr = _target_tr(path, target_tr, max_tr)  # before any voxel: refuses an implausible TR
    shape = read_nifti_header(path).shape
    if len(shape) != 4:
        raise DataError(f"{path}: expected a 4D series (x, y, z, time), got shape {shape}")
    # mypy: _target_tr gives a TR only when target_tr is set.
    plan = None if tr is None else _time_plan(path, shape, tr, target_tr)  # type: ignore[arg-type]
    count = int(shape[3]) if plan is None else len(plan[0])
    if count < spec.shape[3]:
        raise DataError(
            f"{path}: the series has {count} frames, fewer than the {spec.shape[3]} "
            f"frames of one model input; use a longer series or a shorter window"
        )
    if start is None:
        start, stop = 0, count
    begin = start // CHUNK * CHUNK
    # mypy: callers give stop with start (start None: both set above).
    end = min(count, -(-stop // CHUNK) * CHUNK)  # type: ignore[operator]
    # The whole series reads every frame, even those a coarser target TR skips:
    # one inflate and no index.
    first, last = (0, int(shape[3])) if end - begin == count else _source_frames(plan, begin, end)
    data, _ = read_frames(path, first, last, index_dir=index_dir)
    prepared = _prepared(data, first, plan, begin, end, spec.shape[:3])
    # mypy: stop is set here, as above.
    return prepared[..., start - begin : stop - begin]  # type: ignore[index, operator]


def _target_tr(path: str, target_tr: float | None, max_tr: float | None) -> float | None:
    """The source TR when the series must be resampled to ``target_tr``, else None.

    The repetition time is read, and checked against ``max_tr``, either way.
    """
    tr = repetition_time(path, max_tr=MAX_TR if max_tr is None else max_tr)
    if target_tr is None:
        return None
    if tr is None:
        raise DataError(
            f"{path}: no repetition time in the header or a JSON sidecar, so the series "
            f"cannot be resampled to TR {target_tr} s; add RepetitionTime to the sidecar"
        )
    return None if abs(tr - target_tr) < 1e-6 else tr


def bold_frames(
    spec: ModalitySpec,
    paths: str | os.PathLike[str] | Sequence[str],
    *,
    target_tr: float | None = None,
    max_tr: float | None = None,
) -> int:
    """Frames in the series (after resampling to ``target_tr``), from the header alone.

    The checks before training call it (``Windows.frames``), so what it
    refuses is refused before step 1 without decoding a voxel.

    Raises:
        DataError: Not one file, not a usable NIfTI header, not 4D, a
            repetition time over ``max_tr`` (None: :data:`MAX_TR`), or a
            resampling that would grow the series past its bounds. Names the file.
    """
    path = _one_series(spec, paths)
    shape = read_nifti_header(path).shape
    if len(shape) != 4:
        raise DataError(f"{path}: expected a 4D series (x, y, z, time), got shape {shape}")
    tr = _target_tr(path, target_tr, max_tr)
    # mypy: _target_tr gives a TR only when target_tr is set.
    return int(shape[3]) if tr is None else _resampled_count(path, shape, tr, target_tr)  # type: ignore[arg-type]


def bold_series(
    spec: ModalitySpec,
    paths: str | os.PathLike[str] | Sequence[str],
    *,
    target_tr: float | None = None,
    max_tr: float | None = None,
) -> np.ndarray:
    """The whole series preprocessed once, ``(1, x, y, z, frames)`` float32.

    With ``target_tr`` (seconds) the series is first resampled in time, by
    linear interpolation, from its own repetition time (sidecar or header, see
    :func:`repetition_time`) so that a window spans the same seconds in every
    cohort (UK Biobank's 0.735 s and ABIDE's 2 s, say).

    As :func:`load_bold`, but over every frame: the per-voxel mean and standard
    deviation of the z-score, and the background threshold, are the subject's
    statistics over the whole series, so every window of it is normalised the
    same way. Windows are cut from this by the core (``Windows.series``).

    Raises:
        DataError: As :func:`bold_frames` (an implausible repetition time, a
            resampling past its bounds) and :func:`load_bold`. Names the file.
    """
    path = _one_series(spec, paths)
    prepared = prepare_series(spec, path, target_tr=target_tr, max_tr=max_tr)
    return normalise(prepared, statistics(prepared))[np.newaxis]
