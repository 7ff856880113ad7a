"""From a 4D BOLD NIfTI series to a model input."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from umbrella_core import DataError, ModalitySpec
from umbrella_core.imaging import as_paths, load_nifti, resize, zscore_time

__all__ = ["load_bold", "bold_series", "bold_frames", "BACKGROUND_FRACTION"]

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
            f"{path}: expected a 4D series (x, y, z, time), got a 3D volume of shape {data.shape}"
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


def bold_frames(spec: ModalitySpec, paths: str | os.PathLike[str] | Sequence[str]) -> int:
    """Frames in the series, from the header alone (nothing is decoded).

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
    return int(shape[3])


def bold_series(spec: ModalitySpec, paths: str | os.PathLike[str] | Sequence[str]) -> np.ndarray:
    """The whole series preprocessed once, ``(1, x, y, z, frames)`` float32.

    As :func:`load_bold`, but over every frame: the per-voxel mean and standard
    deviation of the z-score, and the background threshold, are the subject's
    statistics over the whole series, so every window of it is normalised the
    same way. Windows are cut from this by the core (``ModalitySpec.series``).
    """
    path = _one_series(spec, paths)
    data, _ = load_nifti(path)
    if data.ndim != 4:
        raise DataError(f"{path}: expected a 4D series (x, y, z, time), got shape {data.shape}")
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
