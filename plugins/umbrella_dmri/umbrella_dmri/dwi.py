"""From a raw diffusion-weighted series (4D NIfTI + ``.bval``/``.bvec``) to FA and MD maps.

The series is fitted voxel by voxel with a diffusion tensor (dipy's
``TensorModel``, weighted least squares) inside a brain mask, and the fit's
eigenvalues give fractional anisotropy (FA, unitless, in [0, 1]) and mean
diffusivity (MD, in mm^2/s when the b-values are in s/mm^2, as scanners and
BIDS write them). :mod:`umbrella_dmri.preprocess` then treats the two maps
exactly like maps read from files.

dipy (and through it scipy) is imported inside the functions that need it, so
importing this module, or the plugin, stays cheap.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from umbrella_core import DataError

__all__ = [
    "B0_THRESHOLD",
    "MIN_DIRECTIONS",
    "MASK_MEDIAN_RADIUS",
    "MASK_NUMPASS",
    "gradient_kind",
    "find_gradients",
    "read_bvals",
    "read_bvecs",
    "brain_mask",
    "fit_dti",
]

#: Volumes with a b-value at or below this (s/mm^2) count as b=0 volumes, as in
#: dipy's ``gradient_table``: scanners often write b=5 or b=15 for them.
B0_THRESHOLD = 50.0

#: A tensor has 6 unknowns besides S0: fewer diffusion-weighted volumes, or
#: directions that do not span them, leave it undetermined.
MIN_DIRECTIONS = 6

#: ``dipy.segment.mask.median_otsu`` settings, those of dipy's DTI example:
#: median filter radius in voxels and number of passes before Otsu's threshold.
#: dipy's defaults (radius 4, 4 passes) erode a head of 2 mm voxels by 1 to 2 voxels.
MASK_MEDIAN_RADIUS = 3
MASK_NUMPASS = 1

_IMAGE_SUFFIXES = (".nii.gz", ".nii")


def gradient_kind(path: str) -> str | None:
    """``"bval"`` or ``"bvec"`` when the file name says it holds b-values or vectors, else None.

    Recognises BIDS/dcm2niix ``*.bval``/``*.bvec`` and FSL's ``bvals``/``bvecs``
    (with or without an extension such as ``.txt``).
    """
    name = os.path.basename(path).lower()
    for kind in ("bval", "bvec"):
        if (
            name.endswith((f".{kind}", f".{kind}s"))
            or name in (f"{kind}s", f"{kind}s.txt")
            or name.endswith((f".{kind}.txt", f".{kind}s.txt"))
        ):
            return kind
    return None


def _stem(path: str) -> str:
    lower = path.lower()
    for suffix in _IMAGE_SUFFIXES:
        if lower.endswith(suffix):
            return path[: -len(suffix)]
    return path


def find_gradients(image: str) -> tuple[str | None, str | None]:
    """The ``.bval`` and ``.bvec`` files next to ``image``, each None when absent.

    Looks for ``<stem>.bval``/``<stem>.bvec`` (BIDS, dcm2niix: ``sub-01_dwi.nii.gz``
    goes with ``sub-01_dwi.bval``), then FSL's ``bvals``/``bvecs`` in the same folder
    (``data.nii.gz`` of HCP and FSL's ``dtifit`` layout).
    """
    stem = _stem(image)
    folder = os.path.dirname(image)
    found: list[str | None] = []
    for kind in ("bval", "bvec"):
        candidates = (f"{stem}.{kind}", os.path.join(folder, f"{kind}s"))
        found.append(next((c for c in candidates if os.path.isfile(c)), None))
    return found[0], found[1]


def expected_gradients(image: str) -> tuple[str, str]:
    """The names :func:`find_gradients` looks for first, for error messages."""
    stem = _stem(image)
    return f"{stem}.bval", f"{stem}.bvec"


def _read_table(path: str, what: str, *, finite: bool = True) -> np.ndarray:
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found ({what})")
    try:
        with open(path, encoding="utf-8") as handle:
            rows = [line.replace(",", " ").split() for line in handle]
        rows = [r for r in rows if r]
        table = np.array([[float(v) for v in r] for r in rows], dtype=np.float64)
    except (OSError, UnicodeDecodeError, ValueError) as error:
        # ValueError: a non-number, or rows of different lengths.
        raise DataError(f"{path}: not a readable {what} file ({error})") from error
    if table.size == 0:
        raise DataError(f"{path}: the {what} file is empty")
    if finite and not np.isfinite(table).all():
        raise DataError(f"{path}: the {what} file holds NaN or infinite values")
    return table


def read_bvals(path: str, volumes: int, image: str) -> np.ndarray:
    """The b-values of ``path`` (s/mm^2), one per volume of ``image``.

    Raises:
        DataError: Not numbers, not one row or one column, a count other than
            ``volumes``, negative or non-finite values. The message names the file.
    """
    table = _read_table(path, "b-value")
    if table.ndim != 2 or min(table.shape) != 1:
        raise DataError(f"{path}: expected one row of b-values, got a table of shape {table.shape}")
    bvals = table.reshape(-1)
    if bvals.size != volumes:
        raise DataError(
            f"{path}: {bvals.size} b-values but {image} has {volumes} volumes; "
            "the b-value file must list one value per volume"
        )
    if (bvals < 0).any():
        raise DataError(f"{path}: b-values must not be negative")
    return bvals


def read_bvecs(path: str, volumes: int, image: str) -> np.ndarray:
    """The gradient directions of ``path`` as a ``(volumes, 3)`` array.

    FSL and BIDS write 3 rows of ``volumes`` values; 3 columns (one row per
    volume, as some tools write) are accepted too. Non-finite entries are
    kept here: some tools write ``nan`` as the direction of b=0 volumes, where
    it means nothing; :func:`fit_dti` refuses them on diffusion-weighted volumes.

    Raises:
        DataError: Not numbers, or a shape other than ``(3, volumes)`` or
            ``(volumes, 3)``. The message names the file.
    """
    table = _read_table(path, "gradient direction", finite=False)
    if table.shape == (3, volumes):
        return table.T.copy()
    if table.shape == (volumes, 3):
        return table
    raise DataError(
        f"{path}: expected 3 rows of {volumes} gradient directions (one per volume of "
        f"{image}), got a table of shape {table.shape}"
    )


def _check_design(
    bvals: np.ndarray, bvecs: np.ndarray, image: str, bval_path: str, bvec_path: str
) -> np.ndarray:
    """Unit gradient directions, after checking the series can determine a tensor."""
    b0 = bvals <= B0_THRESHOLD
    if not b0.any():
        raise DataError(
            f"{bval_path}: no b=0 volume (b-value <= {B0_THRESHOLD:g}) among the "
            f"{bvals.size} volumes of {image}; a tensor fit needs one (b-values are in "
            f"s/mm^2; the smallest here is {bvals.min():g})"
        )
    weighted = ~b0
    bad = weighted & ~np.isfinite(bvecs).all(axis=1)
    if bad.any():
        raise DataError(
            f"{bvec_path}: the gradient directions of {int(bad.sum())} diffusion-weighted "
            f"volumes of {image} are NaN or infinite (first: volume {int(np.argmax(bad))})"
        )
    bvecs = np.where(b0[:, None], 0.0, bvecs)
    if weighted.sum() < MIN_DIRECTIONS:
        raise DataError(
            f"{bval_path}: {int(weighted.sum())} diffusion-weighted volumes (b > "
            f"{B0_THRESHOLD:g}) in {image}; a tensor fit needs at least {MIN_DIRECTIONS} "
            "(b-values in ms/um^2 instead of s/mm^2?)"
        )
    norms = np.linalg.norm(bvecs, axis=1)
    if (norms[weighted] < 1e-3).any():
        raise DataError(
            f"{bvec_path}: a diffusion-weighted volume of {image} has a zero gradient direction"
        )
    # Scanners write directions rounded to a few digits: renormalise rather than
    # refuse (dipy's gradient_table refuses vectors more than 1% off unit length).
    unit = np.zeros_like(bvecs)
    unit[weighted] = bvecs[weighted] / norms[weighted, None]
    g = unit[weighted]
    design = np.stack(
        [
            g[:, 0] ** 2,
            g[:, 1] ** 2,
            g[:, 2] ** 2,
            g[:, 0] * g[:, 1],
            g[:, 0] * g[:, 2],
            g[:, 1] * g[:, 2],
        ],
        axis=1,
    )
    if np.linalg.matrix_rank(design, tol=1e-6) < 6:
        raise DataError(
            f"{bvec_path}: the gradient directions of {image} do not determine a tensor "
            f"(fewer than {MIN_DIRECTIONS} independent directions)"
        )
    return unit


def brain_mask(b0_mean: np.ndarray) -> np.ndarray:
    """A brain mask from the mean b=0 volume: ``dipy.segment.mask.median_otsu``.

    A median filter then Otsu's threshold (:data:`MASK_MEDIAN_RADIUS`,
    :data:`MASK_NUMPASS`), the method of dipy's tensor-fitting example. It
    separates the head from the dark background of a whole-head series
    (non-brain tissue that keeps signal at b=0, such as the eyes, stays in);
    on a crop lying inside the brain it keeps only the brighter part (CSF at
    b=0), so give it whole-head series.
    """
    from dipy.segment.mask import median_otsu

    _, mask = median_otsu(
        np.asarray(b0_mean, dtype=np.float32),
        median_radius=MASK_MEDIAN_RADIUS,
        numpass=MASK_NUMPASS,
    )
    return np.asarray(mask, dtype=bool)


def fit_dti(
    data: np.ndarray,
    bvals: np.ndarray,
    bvecs: np.ndarray,
    *,
    image: str,
    bval_path: str,
    bvec_path: str,
    mask: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """FA and MD of a diffusion-weighted series, zero outside the brain mask.

    FA and MD are invariant to a rotation or reflection of the gradient frame,
    so the directions need no reorientation when the voxel axes of ``data``
    have been permuted or flipped (to RAS, say); the principal direction would.

    Args:
        data: The series, ``(X, Y, Z, volumes)``.
        bvals: One b-value per volume (s/mm^2), from :func:`read_bvals`.
        bvecs: ``(volumes, 3)`` directions, from :func:`read_bvecs`.
        image, bval_path, bvec_path: The files, for error messages.
        mask: The voxels to fit; by default :func:`brain_mask` of the mean b=0 volume.

    Returns:
        ``(fa, md)``: float32 volumes ``(X, Y, Z)``. FA is clipped to [0, 1] and
        MD to >= 0 (noise in a few voxels gives negative eigenvalues); voxels
        where the fit is undefined are 0.

    Raises:
        DataError: No b=0 volume, fewer than :data:`MIN_DIRECTIONS` independent
            directions, a zero direction for a weighted volume, or an empty mask.
    """
    import dipy.reconst.dti as dti
    from dipy.core.gradients import gradient_table

    unit = _check_design(bvals, bvecs, image, bval_path, bvec_path)
    gtab = gradient_table(bvals, bvecs=unit, b0_threshold=B0_THRESHOLD)
    if mask is None:
        mask = brain_mask(data[..., gtab.b0s_mask].mean(axis=-1))
    if not mask.any():
        raise DataError(f"{image}: the brain mask of the b=0 volumes is empty")
    with np.errstate(divide="ignore", invalid="ignore"):
        fit = dti.TensorModel(gtab).fit(data, mask=mask)
        evals = fit.evals
        fa = dti.fractional_anisotropy(evals)
        md = dti.mean_diffusivity(evals)
    fa = np.where(mask & np.isfinite(fa), np.clip(fa, 0.0, 1.0), 0.0).astype(np.float32)
    md = np.where(mask & np.isfinite(md), np.maximum(md, 0.0), 0.0).astype(np.float32)
    return fa, md


def split_gradients(
    files: Sequence[str],
) -> tuple[list[str], dict[str, list[str]]]:
    """The image files and the gradient files (by kind) among ``files``."""
    images: list[str] = []
    gradients: dict[str, list[str]] = {"bval": [], "bvec": []}
    for path in files:
        kind = gradient_kind(path)
        if kind is None:
            images.append(path)
        else:
            gradients[kind].append(path)
    return images, gradients
