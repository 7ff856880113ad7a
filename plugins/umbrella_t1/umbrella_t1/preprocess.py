"""From a T1-weighted NIfTI file (and an optional brain mask) to a model input."""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Callable, Sequence

import numpy as np

from umbrella_core import DataError, ModalitySpec
from umbrella_core.imaging import as_paths, load_nifti, resize, robust_zscore

__all__ = [
    "load_t1",
    "t1_loader",
    "find_brain_mask",
    "output_spacing",
    "T1_SPACING",
    "LOWER_PERCENTILE",
    "UPPER_PERCENTILE",
    "FOREGROUND_THRESHOLD",
    "MASK_SUFFIXES",
]

#: Target voxel spacing in mm (isotropic). 1.5 mm on the default 128^3 grid is
#: a 192 mm field of view: an adult head (about 150 x 190 x 170 mm with scalp)
#: at the resolution most 3D vision models of the brain use. When the head
#: does not fit ``spec.shape`` at this spacing (the 32^3 demo grid), the loader
#: coarsens the spacing until it does: see :func:`output_spacing`.
T1_SPACING = 1.5
#: Intensity percentiles (of the nonzero voxels) intensities are clipped to.
LOWER_PERCENTILE = 0.5
UPPER_PERCENTILE = 99.9
#: Voxels above this fraction of the clipped intensity range are the head.
FOREGROUND_THRESHOLD = 0.1
#: Brain masks found next to ``<entities>_T1w.nii.gz``, tried in this order
#: (``{stem}`` is the T1 file name without its extension, ``{entities}`` the
#: same without the ``_T1w`` suffix and any ``desc-`` entity).
MASK_SUFFIXES = (
    "{entities}_desc-brain_mask",
    "{stem}_desc-brain_mask",
    "{entities}_brainmask",
    "{stem}_brainmask",
    "{stem}_mask",
)

# Head-finding works on a view strided to about this spacing (mm): the bounding
# box is then found from ~600k voxels of a 1 mm image instead of 5 million, at
# a cost of at most one stride in its size, which only enlarges the box. The
# intensity threshold comes from every second voxel of that view (percentiles
# of millions of voxels cost more than decoding them).
_COARSE_MM = 2.0
# A slice of that view belongs to the head when it holds at least this fraction
# of the fullest slice's foreground voxels (and at least two): stray noise
# voxels above the threshold do not stretch the box to the edge of the image.
_SLICE_FRACTION = 0.005
_NIFTI_EXTENSIONS = (".nii.gz", ".nii")


def load_t1(
    spec: ModalitySpec,
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    spacing: float | None = None,
) -> np.ndarray:
    """Load one T1-weighted volume as a ``(1, *spec.shape)`` float32 array.

    Steps:

    1. Read and reorient to RAS; drop trailing singleton axes (some writers
       store a 3D volume as ``(x, y, z, 1)``).
    2. Find the brain mask: the second path when given, else a file next to
       the T1 named as in :data:`MASK_SUFFIXES`; it must be on the same voxel
       grid as the T1. Voxels above 0.5 are inside.
    3. Find the head: the bounding box of the mask, or without a mask of the
       voxels above :data:`FOREGROUND_THRESHOLD` of the percentile-clipped
       range.
    4. Choose the isotropic output spacing with :func:`output_spacing`:
       ``max(spacing, head_extent / shape)``, so the whole head always fits.
    5. Resample (trilinear) the part of the field of view that the output
       covers to that spacing, and centre crop / zero-pad it to
       ``spec.shape`` around the centre of the head's bounding box (not the
       centre of the array: a head scanned off-centre is not cut).
    6. With a mask, set the voxels outside it to 0. Clip to the 0.5th and
       99.9th percentiles of the nonzero voxels and scale to [0, 1]; z-score
       the head (the mask, or voxels above :data:`FOREGROUND_THRESHOLD`) and
       set everything else, padding included, to exactly 0.

    The upper percentile is 99.9 rather than the usual 99.5 because a small
    bright finding (an enhancing lesion covers well under 0.5 % of a head's
    field of view) would otherwise be clipped to the level of bright white
    matter and lose its contrast. The z-score inside the head (values are
    then within about [-3, 3]) centres the input on 0: with [0, 1] inputs a
    large offset shared by every patch dominates a freshly initialised patch
    embedding, and the built-in demo's short training stayed at chance.

    Args:
        spec: The ``t1`` modality with the configured shape.
        paths: The T1 file, or ``[T1 file, brain mask file]``.
        spacing: Target spacing in mm; :data:`T1_SPACING` when None.

    Raises:
        DataError: Not one or two files, an unreadable file, a series of
            several volumes, a mask on another voxel grid than the T1 (the
            message names both files) or an empty mask. The message names
            the file.
    """
    files = as_paths(paths)
    if len(files) not in (1, 2):
        raise DataError(
            f"{spec.name} takes one file per image, optionally followed by a brain mask; "
            f"got {len(files)}: {', '.join(files) or 'none'}"
        )
    path = files[0]
    data, affine = _read_volume(path, "T1-weighted volume")
    mask_path = files[1] if len(files) == 2 else find_brain_mask(path)
    mask = None
    if mask_path is not None:
        mask, mask_affine = _read_volume(mask_path, "brain mask")
        _check_same_grid(path, data.shape, affine, mask_path, mask.shape, mask_affine)
    zooms = np.sqrt(np.square(affine[:3, :3]).sum(axis=0))
    target = float(T1_SPACING if spacing is None else spacing)
    if not target > 0.0:
        raise ValueError(f"load_t1: spacing must be positive, got {spacing}")

    stride = [max(1, round(_COARSE_MM / float(z))) for z in zooms]
    coarse = (mask if mask is not None else data)[:: stride[0], :: stride[1], :: stride[2]]
    if mask is not None:
        inside = coarse > 0.5
        if not inside.any():
            raise DataError(f"{mask_path}: the brain mask is empty (no voxel above 0.5)")
    else:
        inside = _foreground(coarse, coarse[::2, ::2, ::2])
    low, high = _bounding_box(inside, stride, data.shape)
    extent = (high - low + 1) * zooms
    step = output_spacing(extent, spec.shape, target)

    # Per axis: the source voxels the output window touches, their size at
    # the output spacing, and where the window starts in that resampled crop.
    crop, size, offset = [], [], []
    for n, z, lo, hi, length in zip(spec.shape, zooms, low, high, data.shape, strict=True):
        centre = (lo + hi) / 2.0
        half = n * step / float(z) / 2.0
        a = max(0, math.floor(centre - half))
        b = min(length, math.ceil(centre + half) + 1)
        m = max(1, round((b - a) * float(z) / step))
        first = (centre - half + 0.5 * step / float(z) - a + 0.5) * m / (b - a) - 0.5
        crop.append(slice(a, b))
        size.append(m)
        offset.append(round(first))
    # Output voxels [dst] come from resampled voxels [src]; the rest is padding.
    src = tuple(
        slice(max(0, o), min(m, o + n)) for o, m, n in zip(offset, size, spec.shape, strict=True)
    )
    dst = tuple(slice(s.start - o, s.stop - o) for s, o in zip(src, offset, strict=True))

    region = resize(data[tuple(crop)], size)[src]
    out = np.zeros((1, *spec.shape), dtype=np.float32)
    if mask is not None:
        brain = resize(mask[tuple(crop)], size)[src] > 0.5
        robust_zscore(
            region,
            lower=LOWER_PERCENTILE,
            upper=UPPER_PERCENTILE,
            mask=brain,
            # mypy: numpy's stubs take no (int, *slices) index tuple; numpy does.
            out=out[(0, *dst)],  # type: ignore[arg-type]
        )
    else:
        robust_zscore(
            region,
            lower=LOWER_PERCENTILE,
            upper=UPPER_PERCENTILE,
            foreground=FOREGROUND_THRESHOLD,
            # mypy: as above, numpy's stubs refuse the (int, *slices) index.
            out=out[(0, *dst)],  # type: ignore[arg-type]
        )
    return out


def output_spacing(extent_mm: Sequence[float], shape: Sequence[int], spacing: float) -> float:
    """The isotropic output spacing: ``max(spacing, max(extent_mm / shape))``.

    At the target ``spacing`` when the head (``extent_mm``, its bounding box
    in mm per axis) fits ``shape``; otherwise just coarse enough that its
    longest side, relative to the grid, fits. The default 128^3 grid at
    1.5 mm holds a 192 mm head; the 32^3 demo grid holds a 170 mm head at
    about 5.3 mm.
    """
    fit = max(float(e) / int(n) for e, n in zip(extent_mm, shape, strict=True))
    return max(float(spacing), fit)


def t1_loader(spacing: float) -> Callable[..., np.ndarray]:
    """A ``ModalitySpec.load`` with another target spacing, e.g. for 1 mm inputs.

    ``attrs.evolve(T1, load=t1_loader(1.0), shape=(192, 192, 192))`` is a ``t1``
    spec that keeps 1 mm wherever the head fits 192 mm. The loader is a
    :func:`functools.partial`, so it pickles into DataLoader workers.
    """
    if not float(spacing) > 0.0:
        raise ValueError(f"t1_loader: spacing must be positive, got {spacing}")
    return functools.partial(load_t1, spacing=float(spacing))


_LISTINGS: dict[str, tuple[int, frozenset[str]]] = {}


def _listing(folder: str) -> frozenset[str] | None:
    """The names in ``folder``, listed again only when its mtime changes (None: unlistable).

    One listing instead of a stat per mask candidate: a 100,000-subject
    cohort's start-up looked for ten masks beside each T1, and a flat folder
    of 100,000 T1 files is listed once, not once per file.
    """
    try:
        mtime = os.stat(folder).st_mtime_ns
        known = _LISTINGS.get(folder)
        if known is not None and known[0] == mtime:
            return known[1]
        names = frozenset(os.listdir(folder))
    except OSError:
        return None
    if len(_LISTINGS) >= 4096:
        _LISTINGS.clear()
    # A folder changed moments ago may change again within its mtime's resolution.
    if time.time_ns() - mtime > 2_000_000_000:
        _LISTINGS[folder] = (mtime, names)
    return names


def find_brain_mask(path: str | os.PathLike[str]) -> str | None:
    """The brain mask stored next to a T1 file, or None.

    For ``sub-01_ses-1_desc-preproc_T1w.nii.gz`` the candidates are, in order
    (``.nii.gz`` then ``.nii`` for each): ``sub-01_ses-1_desc-brain_mask``
    (BIDS derivatives, fMRIPrep), ``sub-01_ses-1_desc-preproc_T1w_desc-brain_mask``,
    ``sub-01_ses-1_brainmask``, ``sub-01_ses-1_desc-preproc_T1w_brainmask`` and
    ``sub-01_ses-1_desc-preproc_T1w_mask``. The first that exists wins.
    """
    name = os.fspath(path)
    folder, base = os.path.split(name)
    stem = next((base[: -len(e)] for e in _NIFTI_EXTENSIONS if base.endswith(e)), base)
    parts = stem.split("_")
    if len(parts) > 1 and parts[-1] == "T1w":
        parts = parts[:-1]
    entities = "_".join(p for p in parts if not p.startswith("desc-")) or stem
    present = _listing(folder or ".")
    seen = set()
    for pattern in MASK_SUFFIXES:
        candidate_stem = pattern.format(stem=stem, entities=entities)
        for extension in _NIFTI_EXTENSIONS:
            candidate = os.path.join(folder, candidate_stem + extension)
            if candidate in seen or candidate == name:
                continue
            seen.add(candidate)
            if present is not None and candidate_stem + extension not in present:
                continue
            if os.path.isfile(candidate):
                return candidate
    return None


def _read_volume(path: str, what: str) -> tuple[np.ndarray, np.ndarray]:
    # Stored type, flips as views: only the cropped part is converted, by resize.
    data, affine = load_nifti(path, native=True)
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(
            f"{path}: expected one 3D {what}, got shape {data.shape} "
            f"({int(np.prod(data.shape[3:]))} volumes); split the series or pick one volume"
        )
    return data, affine


def _check_same_grid(
    path: str,
    shape: tuple[int, ...],
    affine: np.ndarray,
    mask_path: str,
    mask_shape: tuple[int, ...],
    mask_affine: np.ndarray,
) -> None:
    # Both are in RAS, so a mask stored in another orientation of the same
    # grid matches; float32 sforms differ in their last digits, hence atol.
    if shape == mask_shape and np.allclose(affine, mask_affine, rtol=1e-5, atol=1e-3):
        return
    zooms = np.sqrt(np.square(affine[:3, :3]).sum(axis=0))
    mask_zooms = np.sqrt(np.square(mask_affine[:3, :3]).sum(axis=0))
    raise DataError(
        f"{mask_path}: the brain mask is on another voxel grid than {path} "
        f"(mask {_describe(mask_shape, mask_zooms)}, T1 {_describe(shape, zooms)}, "
        "or another position); resample the mask to the T1 first"
    )


def _describe(shape: tuple[int, ...], zooms: np.ndarray) -> str:
    size = "x".join(str(s) for s in shape)
    mm = "x".join(f"{float(z):g}" for z in zooms)
    return f"{size} voxels of {mm} mm"


def _foreground(volume: np.ndarray, sample: np.ndarray) -> np.ndarray:
    """Voxels above :data:`FOREGROUND_THRESHOLD` of the range clipped at ``sample`` percentiles."""
    values = sample[sample != 0]
    if values.size == 0:
        return np.zeros(volume.shape, dtype=bool)
    lo, hi = np.percentile(values, [LOWER_PERCENTILE, UPPER_PERCENTILE])
    return volume > lo + FOREGROUND_THRESHOLD * (hi - lo)


def _bounding_box(
    inside: np.ndarray, stride: Sequence[int], shape: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """First and last full-resolution voxel of the head per axis (the whole image if none)."""
    low = np.zeros(3)
    high = np.asarray(shape[:3], dtype=np.float64) - 1
    plane = inside.sum(axis=2, dtype=np.int32)
    profiles = (plane.sum(axis=1), plane.sum(axis=0), inside.sum(axis=(0, 1), dtype=np.int32))
    for axis, counts in enumerate(profiles):
        if counts.max(initial=0) == 0:
            continue
        found = np.flatnonzero(counts >= max(2, _SLICE_FRACTION * counts.max()))
        if found.size == 0:
            found = np.flatnonzero(counts)
        s = stride[axis]
        # A coarse slice stands for the ``s`` voxels from it on; widen by one
        # stride below so the box never cuts the head.
        low[axis] = max(0, (found[0] - 1) * s + 1)
        high[axis] = min(shape[axis] - 1, found[-1] * s + s - 1)
    return low, high
