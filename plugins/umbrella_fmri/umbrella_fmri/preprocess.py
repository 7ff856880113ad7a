"""From a 4D BOLD NIfTI series to a model input."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from umbrella_core import DataError, ModalitySpec
from umbrella_core.imaging import as_paths, load_nifti, resize, zscore_time

__all__ = [
    "load_bold",
    "bold_series",
    "bold_frames",
    "repetition_time",
    "sidecar_of",
    "BACKGROUND_FRACTION",
]

#: Voxels whose mean over the window is below this fraction of the 98th
#: percentile of voxel means are background (air, outside the head).
BACKGROUND_FRACTION = 0.2


def load_bold(
    spec: ModalitySpec, paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]
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

    Raises:
        DataError: Not exactly one file, an unreadable file, a 3D volume
            instead of a series, or a series shorter than ``T`` frames. The
            message names the file.
    """
    files = as_paths(paths)
    if len(files) != 1:
        raise DataError(
            f"{spec.name} takes one 4D file per image, got {len(files)}: "
            f"{', '.join(files) or 'none'}"
        )
    path = files[0]
    frames = spec.shape[3]
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


def repetition_time(path: str | os.PathLike[str]) -> float | None:
    """The repetition time in seconds: the BIDS sidecar's ``RepetitionTime``, else the header.

    The sidecar is the ``.json`` file with the image's name; the header's
    ``pixdim[4]`` is converted from its time unit (ms and us are common in the
    wild). None when neither gives a positive value.

    Raises:
        DataError: The sidecar exists but is not valid JSON. Names the file.
    """
    import json

    import nibabel as nib

    name = os.fspath(path)
    sidecar = sidecar_of(name)
    if os.path.isfile(sidecar):
        try:
            with open(sidecar, encoding="utf-8") as handle:
                value = json.load(handle).get("RepetitionTime")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
            raise DataError(f"{sidecar}: not a valid JSON sidecar ({error})") from None
        if isinstance(value, (int, float)) and value > 0:
            return float(value)
    header = nib.load(name).header
    zooms = header.get_zooms()
    if len(zooms) < 4 or not zooms[3] > 0:
        return None
    unit = header.get_xyzt_units()[1]
    return float(zooms[3]) * {"msec": 1e-3, "usec": 1e-6}.get(unit, 1.0)


def _resampled_frames(frames: int, tr: float, target_tr: float) -> int:
    return int(np.floor((frames - 1) * tr / target_tr + 1e-9)) + 1


def _resample_time(data: np.ndarray, tr: float, target_tr: float) -> np.ndarray:
    """Linear interpolation of the last axis from ``tr`` to ``target_tr`` seconds."""
    count = _resampled_frames(data.shape[-1], tr, target_tr)
    position = np.arange(count) * (target_tr / tr)
    low = np.minimum(np.floor(position).astype(np.int64), data.shape[-1] - 1)
    high = np.minimum(low + 1, data.shape[-1] - 1)
    weight = (position - low).astype(np.float32)
    return data[..., low] * (1.0 - weight) + data[..., high] * weight


def _target_tr(path: str, target_tr: float | None) -> float | None:
    """The source TR when the series must be resampled to ``target_tr``, else None."""
    if target_tr is None:
        return None
    tr = repetition_time(path)
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
) -> int:
    """Frames in the series (after resampling to ``target_tr``), from the header alone.

    Raises:
        DataError: Not one file, not readable as NIfTI, or not 4D. Names the file.
    """
    import nibabel as nib

    path = _one_series(spec, paths)
    try:
        shape = nib.load(path).shape
    except Exception as error:  # nibabel raises several types for unreadable files
        raise DataError(f"{path}: not a readable NIfTI file ({error})") from None
    if len(shape) != 4:
        raise DataError(f"{path}: expected a 4D series (x, y, z, time), got shape {shape}")
    tr = _target_tr(path, target_tr)
    return int(shape[3]) if tr is None else _resampled_frames(int(shape[3]), tr, target_tr)


def bold_series(
    spec: ModalitySpec,
    paths: str | os.PathLike[str] | Sequence[str],
    *,
    target_tr: float | None = None,
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
    """
    path = _one_series(spec, paths)
    data, _ = load_nifti(path)
    if data.ndim != 4:
        raise DataError(f"{path}: expected a 4D series (x, y, z, time), got shape {data.shape}")
    tr = _target_tr(path, target_tr)
    if tr is not None:
        data = _resample_time(data, tr, target_tr)
    if data.shape[3] < spec.shape[3]:
        raise DataError(
            f"{path}: the series has {data.shape[3]} frames, fewer than the {spec.shape[3]} "
            f"frames of one model input; use a longer series or a shorter window"
        )
    resampled = resize(data, spec.shape[:3])
    mean = resampled.mean(axis=-1)
    background = mean < BACKGROUND_FRACTION * np.percentile(mean, 98)
    series = zscore_time(resampled)
    series[background] = 0.0
    return series[np.newaxis]
