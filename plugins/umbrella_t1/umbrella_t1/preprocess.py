"""From a T1-weighted NIfTI file to a model input."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from umbrella_core import DataError, ModalitySpec
from umbrella_core.imaging import as_paths, load_nifti, resize, robust_normalise, zscore_masked

__all__ = ["load_t1", "LOWER_PERCENTILE", "UPPER_PERCENTILE", "FOREGROUND_THRESHOLD"]

#: Intensity percentiles (of the nonzero voxels) intensities are clipped to.
LOWER_PERCENTILE = 0.5
UPPER_PERCENTILE = 99.9
#: Voxels above this fraction of the clipped intensity range are the head.
FOREGROUND_THRESHOLD = 0.1


def load_t1(
    spec: ModalitySpec, paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]
) -> np.ndarray:
    """Load one T1-weighted volume as a ``(1, *spec.shape)`` float32 array.

    Steps: read and reorient to RAS; drop trailing singleton axes (some
    writers store a 3D volume as ``(x, y, z, 1)``); resample the whole field of
    view to ``spec.shape`` with trilinear interpolation (the aspect ratio
    follows the field of view, nothing is cropped); clip to the 0.5th and
    99.9th percentiles of the nonzero voxels and scale to [0, 1]; z-score the
    head (voxels above :data:`FOREGROUND_THRESHOLD`) and set the background
    to exactly 0.

    The upper percentile is 99.9 rather than the usual 99.5 because a small
    bright finding (an enhancing lesion covers well under 0.5 % of a head's
    field of view) would otherwise be clipped to the level of bright white
    matter and lose its contrast. The z-score inside the head (values are
    then within about [-3, 3]) centres the input on 0: with [0, 1] inputs a
    large offset shared by every patch dominates a freshly initialised patch
    embedding, and the built-in demo's short training stayed at chance.

    Args:
        spec: The ``t1`` modality with the configured shape.
        paths: One file (a path, or a sequence holding one path).

    Raises:
        DataError: Not exactly one file, an unreadable file, or a series of
            several volumes. The message names the file.
    """
    files = as_paths(paths)
    if len(files) != 1:
        raise DataError(
            f"{spec.name} takes one file per image, got {len(files)}: {', '.join(files) or 'none'}"
        )
    path = files[0]
    data, _ = load_nifti(path)
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(
            f"{path}: expected one 3D T1-weighted volume, got shape {data.shape} "
            f"({int(np.prod(data.shape[3:]))} volumes); split the series or pick one volume"
        )
    unit = robust_normalise(
        resize(data, spec.shape), lower=LOWER_PERCENTILE, upper=UPPER_PERCENTILE
    )
    return zscore_masked(unit, unit > FOREGROUND_THRESHOLD)[np.newaxis]
