"""The built-in baseline: regional means of 3D images, regional connectivity of 4D series.

A ``trylast`` implementation of ``umbrella_baselines``, so that a plugin's own
representation of its modality (an atlas, a tract profile) is asked first. It
represents any modality by its spec alone (invariant I1: no modality name):

* 3D (``ndim`` 3, a T1, a dMRI FA/MD map pair, any channels): each channel
  averaged over a coarse grid of :data:`GRID_3D` regions per axis (adaptive
  average pooling), ``channels * GRID_3D**3`` features; for dMRI this is
  regional FA and MD.
* 4D (``ndim`` 4, an fMRI window ``(channels, x, y, z, t)``): each channel's
  mean time series over :data:`GRID_4D` regions per axis, the Pearson
  correlation of every pair of the ``R = channels * GRID_4D**3`` regions,
  Fisher z-transformed: ``R * (R - 1) / 2`` features, the upper triangle of the
  functional-connectivity matrix.

Grids are coarse on purpose: a linear model on a few hundred features is what
the field compares brain foundation models with, and the demo's few hundred
training samples can fit it.
"""

from __future__ import annotations

from typing import Any

from umbrella_core.hookspecs import hookimpl
from umbrella_core.types import Baseline, ModalitySpec

__all__ = ["GRID_3D", "GRID_4D", "REGIONAL", "regional_means", "connectivity"]

#: Regions per axis of a 3D image.
GRID_3D = 4
#: Regions per axis of a 4D series (27 regions per channel: 351 correlations).
GRID_4D = 3
# |r| is clipped below 1 so that a perfect correlation has a finite z.
_LARGEST_R = 1.0 - 1e-7


def _pool_axis(array: Any, axis: int, regions: int) -> Any:
    """Means over ``regions`` spans of ``axis``, as ``torch``'s adaptive average pooling
    cuts them (span ``i`` is ``floor(i L / n) ... ceil((i + 1) L / n)``)."""
    import numpy as np

    length = array.shape[axis]
    regions = min(regions, length)
    starts = (np.arange(regions) * length) // regions
    ends = -((-np.arange(1, regions + 1) * length) // regions)
    sums = np.cumsum(array, axis=axis, dtype=np.float64)
    zero = np.zeros_like(np.take(sums, [0], axis=axis))
    sums = np.concatenate([zero, sums], axis=axis)
    shape = [1] * array.ndim
    shape[axis] = regions
    widths = (ends - starts).reshape(shape)
    return (np.take(sums, ends, axis=axis) - np.take(sums, starts, axis=axis)) / widths


def regional_means(image: Any, regions: int = GRID_3D) -> Any:
    """``image`` ``(channels, x, y, z, ...)`` averaged over ``regions`` spans of x, y and z.

    Returns:
        float64 array ``(channels, rx, ry, rz, ...)``, ``r = min(regions, axis length)``.
    """
    import numpy as np

    pooled = np.asarray(image, dtype=np.float64)
    for axis in (1, 2, 3):
        pooled = _pool_axis(pooled, axis, regions)
    return pooled


def connectivity(series: Any, regions: int = GRID_4D) -> Any:
    """The upper triangle of the Fisher-z correlations between regional mean time series.

    Args:
        series: ``(channels, x, y, z, t)``.
        regions: Regions per spatial axis.

    Returns:
        float64 array of ``R * (R - 1) / 2`` values, ``R`` the regions over all
        channels. A region whose series is constant correlates 0 with every other.
    """
    import numpy as np

    means = regional_means(series, regions)
    timeseries = means.reshape(-1, means.shape[-1])
    centred = timeseries - timeseries.mean(axis=1, keepdims=True)
    norms = np.sqrt((centred**2).sum(axis=1))
    norms[norms == 0] = np.inf  # constant: r = 0, not NaN
    unit = centred / norms[:, None]
    r = np.clip(unit @ unit.T, -_LARGEST_R, _LARGEST_R)
    upper = np.triu_indices(len(r), k=1)
    return np.arctanh(r[upper])


def _features(spec: ModalitySpec, image: Any) -> Any:
    if spec.ndim == 4:
        return connectivity(image)
    return regional_means(image).ravel()


def _regions(spec: ModalitySpec, grid: int) -> tuple[int, ...]:
    return tuple(min(grid, size) for size in spec.shape[:3])


def _describe(spec: ModalitySpec) -> str:
    channels = f"{spec.channels} channel{'s' if spec.channels != 1 else ''}"
    if spec.ndim == 4:
        grid = _regions(spec, GRID_4D)
        n = spec.channels * grid[0] * grid[1] * grid[2]
        return (
            f"{n * (n - 1) // 2} Fisher-z correlations between {n} regional mean time series "
            f"({'x'.join(map(str, grid))} grid, {channels}, {spec.shape[3]} frames)"
        )
    grid = _regions(spec, GRID_3D)
    n = spec.channels * grid[0] * grid[1] * grid[2]
    return f"{n} regional means ({'x'.join(map(str, grid))} grid, {channels})"


REGIONAL = Baseline(
    name="regional",
    description=(
        f"3D images: each channel's mean over {GRID_3D}x{GRID_3D}x{GRID_3D} regions; "
        f"4D series: Fisher-z correlations of {GRID_4D}x{GRID_4D}x{GRID_4D} regions' "
        "mean time series"
    ),
    applies=lambda spec: spec.ndim in (3, 4),
    features=_features,
    describe=_describe,
)


@hookimpl(trylast=True)
def umbrella_baselines() -> list[Baseline]:
    return [REGIONAL]
