"""From a 4D BOLD NIfTI series to a model input."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from umbrella_core import DataError, ModalitySpec
from umbrella_core.imaging import as_paths, load_nifti, resize, zscore_time

__all__ = ["load_bold", "BACKGROUND_FRACTION"]

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
