"""Resampling and intensity normalisation of volumes and series.

Part of :mod:`umbrella_core.imaging`, which re-exports every public name.
torch is imported only inside :func:`resize`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from numpy.typing import ArrayLike, NDArray

_MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}


def resize(array: ArrayLike, shape: Sequence[int]) -> NDArray[np.float32]:
    """Resample the leading ``len(shape)`` axes of ``array`` to ``shape``.

    Linear interpolation (trilinear for volumes) with ``align_corners=False``,
    so the field of view is kept and voxel centres are resampled, as image
    resampling tools do. Trailing axes (time points, channels) are carried
    along unchanged: a ``(X, Y, Z, T)`` series resized to ``(x, y, z)`` gives
    ``(x, y, z, T)``.

    A 3D volume that is not C-contiguous (NIfTI's x-fastest layout, as
    :func:`load_nifti` returns it, or any view of one: crops, flips,
    permutations, any numeric dtype) is converted to float32 once, in
    x-fastest (Fortran) order, and resampled there; the result is x-fastest
    too. Transposing a 1 mm volume to C order would cost as much as
    resampling it, and every orientation of one image ends in the same
    layout, so later reductions give bit-identical results.

    Args:
        array: Array whose first ``len(shape)`` axes are spatial.
        shape: Target size of the spatial axes (1 to 3 entries).

    Returns:
        A float32 array of shape ``(*shape, *array.shape[len(shape):])`` with
        positive strides.
    """
    source = np.asarray(array)
    target = tuple(int(s) for s in shape)
    spatial = len(target)
    if spatial not in _MODES:
        raise ValueError(f"resize: shape must have 1 to 3 entries, got {target}")
    if source.ndim < spatial:
        raise ValueError(f"resize: array of shape {source.shape} has fewer than {spatial} axes")
    if any(s <= 0 for s in target):
        raise ValueError(f"resize: target shape {target} must be positive")
    rest = source.shape[spatial:]

    import torch
    import torch.nn.functional as F

    if not rest and source.ndim == 3 and not source.flags.c_contiguous:
        # Resample the reversed-axes view, which is C-contiguous.
        data = np.array(source, dtype=np.float32, order="F", copy=None)
        if data.shape == target:
            return data
        tensor = torch.from_numpy(data.T)[None, None]
        with torch.no_grad():
            out = F.interpolate(
                tensor, size=target[::-1], mode=_MODES[spatial], align_corners=False
            )
        return out[0, 0].numpy().T
    data = np.asarray(source, dtype=np.float32)
    if data.shape[:spatial] == target:
        return np.ascontiguousarray(data)
    # Trailing axes become interpolate's channel axis, which it does not resample.
    source = np.ascontiguousarray(data).reshape(*data.shape[:spatial], math.prod(rest))
    tensor = torch.from_numpy(source).movedim(-1, 0).unsqueeze(0)
    with torch.no_grad():
        out = F.interpolate(tensor, size=target, mode=_MODES[spatial], align_corners=False)
    result = out.squeeze(0).movedim(0, -1).reshape(*target, *rest)
    return np.ascontiguousarray(result.numpy())


#: Voxels above which :func:`robust_normalise` estimates percentiles from a sample.
PERCENTILE_SAMPLE = 1 << 18


def robust_normalise(
    array: ArrayLike, lower: float = 0.5, upper: float = 99.5
) -> NDArray[np.float32]:
    """Clip to the ``lower``/``upper`` percentiles and scale to [0, 1].

    Percentiles are taken over the nonzero voxels when there are any, so that a
    zero-filled background (skull-stripped or masked images) does not pull the
    lower bound down. A constant image becomes all zeros. Above
    :data:`PERCENTILE_SAMPLE` voxels the percentiles are estimated from an
    evenly strided sample of that size: sorting millions of voxels costs more
    than decoding them, and the clip points move by a fraction of a grey level.

    Args:
        array: Any array.
        lower: Lower percentile (0-100), mapped to 0.
        upper: Upper percentile (0-100), mapped to 1.

    Returns:
        A float32 array of the same shape with values in [0, 1].
    """
    if not 0.0 <= lower < upper <= 100.0:
        raise ValueError(f"robust_normalise: need 0 <= lower < upper <= 100, got {lower}, {upper}")
    data = np.asarray(array, dtype=np.float32)
    flat = data.reshape(-1)
    if flat.size > PERCENTILE_SAMPLE:
        flat = flat[:: -(-flat.size // PERCENTILE_SAMPLE)]
    values = flat[flat != 0]
    if values.size == 0:
        values = flat
    if values.size == 0:
        return np.zeros_like(data)
    lo, hi = (float(v) for v in np.percentile(values, [lower, upper]))
    if not hi > lo:
        return np.zeros_like(data)
    out = (data - np.float32(lo)) * np.float32(1.0 / (hi - lo))
    return np.clip(out, 0.0, 1.0, out=out)


def zscore_masked(array: ArrayLike, mask: ArrayLike) -> NDArray[np.float32]:
    """Z-score the voxels inside ``mask`` and set the others to exactly 0.

    This is the usual input normalisation for MR images (nnU-Net's, for one):
    tissue is centred on 0 with unit spread, whatever the scanner's units, and
    the background is a constant 0 rather than a large negative offset that
    every patch would share.

    Args:
        array: Any array.
        mask: Boolean array of the same shape: the foreground.

    Returns:
        A float32 array of the same shape; all zeros when the mask is empty or
        the foreground is constant.
    """
    data = np.asarray(array, dtype=np.float32)
    inside = np.asarray(mask, dtype=bool)
    if inside.shape != data.shape:
        raise ValueError(f"zscore_masked: mask shape {inside.shape} != array shape {data.shape}")
    out = np.zeros_like(data)
    values = data[inside]
    if values.size == 0:
        return out
    std = float(values.std())
    if std > 0.0:
        out[inside] = (values - np.float32(values.mean())) / np.float32(std)
    return out


def robust_zscore(
    volume: NDArray[np.float32],
    *,
    lower: float,
    upper: float,
    foreground: float | None = None,
    mask: NDArray[np.bool_] | None = None,
    out: NDArray[np.float32] | None = None,
) -> NDArray[np.float32]:
    """Clip a volume to percentiles and z-score its foreground, in a few passes.

    The result equals ``zscore_masked(robust_normalise(volume, lower, upper),
    head)`` (up to float rounding), where ``head`` is ``mask`` when given and
    otherwise the voxels above ``foreground`` of the clipped range; it costs
    about a third as much. The percentiles are those of the nonzero voxels
    (inside ``mask`` when given) of a regular 3D subgrid of about
    :data:`PERCENTILE_SAMPLE` / 2 voxels; the mean and spread are over every
    foreground voxel.

    Args:
        volume: A float32 3D array; it may be overwritten (clipped) in place.
        lower: Lower clip percentile (0-100).
        upper: Upper clip percentile (0-100).
        foreground: Fraction of the clipped range above which a voxel is
            foreground when there is no ``mask``.
        mask: Boolean array of ``volume``'s shape: the foreground.
        out: Where to write the result (any layout, ``volume``'s shape);
            a new array in ``volume``'s layout when None.

    Returns:
        ``out``: the z-scored foreground, exactly 0 elsewhere (all zeros when
        the foreground is empty or constant).
    """
    if not 0.0 <= lower < upper <= 100.0:
        raise ValueError(f"robust_zscore: need 0 <= lower < upper <= 100, got {lower}, {upper}")
    if (mask is None) == (foreground is None):
        raise ValueError("robust_zscore: give exactly one of foreground= and mask=")
    if not (volume.flags.c_contiguous or volume.flags.f_contiguous):
        # The dot products below need flat views; one compact copy is cheaper.
        volume = np.array(volume, dtype=np.float32, order="K")
    if out is None:
        out = np.empty_like(volume)
    step = max(1, math.ceil((volume.size / (PERCENTILE_SAMPLE // 2)) ** (1.0 / 3.0)))
    sample = volume[::step, ::step, ::step]
    keep = sample != 0
    if mask is not None:
        keep &= mask[::step, ::step, ::step]
    values = sample[keep]
    if values.size == 0:
        out[...] = 0.0
        return out
    lo, hi = (float(v) for v in np.percentile(values, [lower, upper]))
    if not hi > lo:
        out[...] = 0.0
        return out
    np.clip(volume, lo, hi, out=volume)
    # mypy: without a mask the callers give foreground (robust_zscore's contract).
    head = mask if mask is not None else volume > lo + float(foreground) * (hi - lo)  # type: ignore[arg-type]
    # Masked sums as dot products with a 0/1 float copy of the mask: numpy's
    # boolean indexing and where= reductions are several times slower.
    # One flattening order for every operand (volume's own, so it is a view).
    order = "F" if volume.flags.f_contiguous and not volume.flags.c_contiguous else "C"
    # mypy: order is "F" or "C" (a str to mypy, a Literal to numpy's stubs).
    weight = head.astype(np.float32).ravel(order=order)  # type: ignore[arg-type]
    count = float(weight.sum())
    if count == 0.0:
        out[...] = 0.0
        return out
    flat = volume.ravel(order=order)  # type: ignore[arg-type]  # order: as above
    mean = float(np.dot(flat, weight)) / count
    # where, not a product with the mask: that would leave -0.0 outside.
    centred = np.where(head, volume - np.float32(mean), np.float32(0.0))
    spread = centred.ravel(order=order)  # type: ignore[arg-type]  # order: as above
    variance = float(np.dot(spread, spread)) / count
    if not variance > 0.0:
        out[...] = 0.0
        return out
    np.multiply(centred, np.float32(1.0 / math.sqrt(variance)), out=out)
    return out


def zscore_time(series: ArrayLike, eps: float = 1e-6) -> NDArray[np.float32]:
    """Z-score every voxel's time course (the last axis).

    Voxels whose standard deviation is below ``eps`` (constant background, a
    dead voxel) become 0 rather than noise amplified by a tiny divisor.

    Args:
        series: Array whose last axis is time.
        eps: Standard deviations at or below this count as constant.

    Returns:
        A float32 array of the same shape: mean 0 and standard deviation 1 along
        the last axis, or 0 for constant voxels.
    """
    data = np.asarray(series, dtype=np.float32)
    mean = data.mean(axis=-1, keepdims=True)
    centred = data - mean
    std = np.sqrt(np.mean(centred * centred, axis=-1, keepdims=True))
    constant = std <= eps
    scale = np.where(constant, np.float32(0.0), 1.0 / np.where(constant, 1.0, std))
    return (centred * scale.astype(np.float32)).astype(np.float32, copy=False)
