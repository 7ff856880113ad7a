"""Modality-agnostic NIfTI helpers shared by the modality plugins.

Reading and writing (:func:`load_nifti`, :func:`save_nifti`), reorientation
(:func:`reorient`), resampling (:func:`resize`), intensity normalisation
(:func:`robust_normalise`, :func:`zscore_time`) and the building blocks of the
synthetic phantoms (:func:`head_phantom`, :func:`blob`, :func:`hemisphere_centre`,
:func:`bias_field`, :func:`rician_noise`, :func:`random_orientation`).

Nothing here knows about a particular modality: plugins combine these pieces
with their own contrasts and conventions. numpy and nibabel are imported with
the module; torch only inside :func:`resize`, so a plugin that imports this
module at hook time does not pull torch into ``umbrella plugins``.
"""

from __future__ import annotations

import gzip
import io
import math
import os
import zlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import attrs
import nibabel as nib
import numpy as np
from nibabel import orientations as nio

from umbrella_core.errors import DataError

if TYPE_CHECKING:  # pragma: no cover
    from numpy.typing import ArrayLike, NDArray

__all__ = [
    "RAS",
    "PHANTOM_ORIENTATIONS",
    "as_paths",
    "missing_file_message",
    "load_nifti",
    "save_nifti",
    "reorient",
    "resize",
    "robust_normalise",
    "zscore_masked",
    "robust_zscore",
    "zscore_time",
    "HeadPhantom",
    "head_phantom",
    "world_grid",
    "blob",
    "hemisphere_centre",
    "hemisphere_mask",
    "bias_field",
    "rician_noise",
    "random_orientation",
]

#: Axis codes of the canonical orientation every loader returns: the first axis
#: increases to the Right, the second to the Anterior, the third to the Superior.
RAS: tuple[str, str, str] = ("R", "A", "S")

#: Orientations phantoms are written in. Scanners and pipelines store volumes in
#: all of these (LAS: FSL/SPM radiological; LPS: DICOM/ITK; LIA: FreeSurfer;
#: PIR: sagittal acquisitions), so a loader that ignores the affine gets the
#: hemisphere wrong on most of them.
PHANTOM_ORIENTATIONS: tuple[tuple[str, str, str], ...] = (
    ("R", "A", "S"),
    ("L", "A", "S"),
    ("L", "P", "S"),
    ("L", "I", "A"),
    ("P", "I", "R"),
)

# Errors nibabel, gzip and zlib raise for files that are not NIfTI, are
# truncated or cannot be decoded. Anything else is a bug and should surface.
_DECODE_ERRORS = (
    OSError,
    EOFError,
    ValueError,
    zlib.error,
    nib.filebasedimages.ImageFileError,
    nib.spatialimages.HeaderDataError,
)


#: What to do about a file that does not decode.
REEXPORT = "the file is truncated or corrupt: copy or re-export it"

# ---------------------------------------------------------------------------
# Reading and writing
# ---------------------------------------------------------------------------


def as_paths(paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> tuple[str, ...]:
    """The file(s) a loader was given, as a tuple of strings (one path or several)."""
    if isinstance(paths, (str, os.PathLike)):
        return (os.fspath(paths),)
    return tuple(os.fspath(p) for p in paths)


def missing_file_message(path: str | os.PathLike[str]) -> str:
    """Why ``path`` cannot be opened, naming it and saying what to do.

    A folder on the way that the user may not enter (``chmod 000``) makes a
    file look absent to ``stat``; the message then names that folder instead
    of claiming the file does not exist.
    """
    name = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(name))
    while folder and not os.path.isdir(folder):
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    if os.path.isdir(folder) and not os.access(folder, os.R_OK | os.X_OK):
        return (
            f"{name}: cannot be read: permission denied on the folder {folder}; "
            "make it readable (chmod a+rx) or run as a user who can read it"
        )
    if os.path.exists(name) and not os.access(name, os.R_OK):
        return f"{name}: cannot be read: permission denied; make it readable (chmod a+r)"
    return (
        f"{name}: file not found; check the path (relative paths are relative to the "
        "manifest's folder) or remove the record"
    )


def load_nifti(
    path: str | os.PathLike[str], *, native: bool = False
) -> tuple[NDArray[Any], NDArray[np.float64]]:
    """Read a NIfTI file as float32 data in the closest canonical (RAS) orientation.

    The voxel axes are permuted and flipped (no interpolation) so that the first
    three axes run to the Right, Anterior and Superior; trailing axes (time,
    volumes) are kept as they are. Scaling (``scl_slope``/``scl_inter``) is
    applied while reading, directly in float32.

    Args:
        path: A ``.nii`` or ``.nii.gz`` file.
        native: Keep the stored data type when the file has no scaling (an
            int16 volume stays int16) and return the reoriented voxels as a
            view, flips included (negative strides). For loaders that crop or
            resample first and convert only what they keep: converting and
            un-flipping a whole 1 mm volume costs as much as resampling it.

    Returns:
        ``(data, affine)``: an array of at least three dimensions (float32
        unless ``native``), in the file's memory order (x fastest, as NIfTI
        stores it) with positive strides unless ``native``, and the 4x4
        voxel-to-world affine of that array.

    Raises:
        DataError: The file is missing, is not a NIfTI image, cannot be decoded
            (truncated or corrupt gzip, data shorter than the header says), has
            fewer than three dimensions, holds NaN or infinite voxels, or has a
            non-finite or singular affine. The message names the file.
    """
    name = os.fspath(path)
    if not os.path.exists(name) or not os.access(name, os.R_OK):
        raise DataError(missing_file_message(name))
    if os.path.isdir(name):
        raise DataError(f"{name}: is a folder, expected a NIfTI file")
    try:
        img = _read_image(name)
    except PermissionError:
        raise DataError(missing_file_message(name)) from None
    except _DECODE_ERRORS as error:
        raise DataError(
            f"{name}: not a readable NIfTI file ({_reason(error)}); {REEXPORT}"
        ) from error
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise DataError(
            f"{name}: not a NIfTI file (nibabel reads it as {type(img).__name__}); "
            "convert it to NIfTI (.nii or .nii.gz), e.g. with dcm2niix"
        )
    affine = np.asarray(img.affine, dtype=np.float64)
    _check_affine(name, affine)
    try:
        # asarray with a dtype scales in float32: get_fdata would build a
        # float64 copy twice the size of what we keep.
        data = _voxels(img, native=native)
    except _DECODE_ERRORS as error:
        raise DataError(
            f"{name}: cannot decode the image data ({_reason(error)}); {REEXPORT}"
        ) from error
    if data.ndim < 3:
        raise DataError(f"{name}: expected a 3D or 4D image, got shape {data.shape}")
    if data.size == 0:
        raise DataError(f"{name}: image is empty (shape {data.shape}); {REEXPORT}")
    # Integers scaled by finite factors cannot be NaN or infinite: skip the scan.
    stored_integer = np.issubdtype(img.get_data_dtype(), np.integer)
    slope, inter = img.header.get_slope_inter()
    scaling_finite = all(v is None or np.isfinite(v) for v in (slope, inter))
    finite = True if stored_integer and scaling_finite else np.isfinite(data)
    if finite is not True and not finite.all():
        bad = int(data.size - np.count_nonzero(finite))
        raise DataError(
            f"{name}: {bad} of {data.size} voxels are NaN or infinite; replace them "
            "(e.g. fslmaths IN -nan OUT) or re-export the file"
        )
    data, affine = reorient(data, affine, RAS)
    if native:
        return data, affine
    # Flips are negative-stride views, which torch.from_numpy refuses. Copy
    # them in the file's own memory order ("K"): turning NIfTI's x-fastest
    # layout into C order would be a full transpose, slower than the decode.
    if any(step < 0 for step in data.strides):
        data = np.array(data, order="K")
    return data, affine


def _gunzip(raw: bytes) -> bytes:
    """Decompress a whole gzip stream, with ISA-L when it is installed.

    Decompressing dominates the time to read a ``.nii.gz``; ISA-L's inflate is
    about twice as fast as zlib's, and taking the file in one call avoids the
    small reads nibabel's streaming reader makes.
    """
    try:
        from isal import igzip
    except ImportError:  # pragma: no cover - isal is a dependency; stdlib is the fallback
        return gzip.decompress(raw)
    return igzip.decompress(raw)


def _voxels(img: nib.spatialimages.SpatialImage, *, native: bool = False) -> NDArray[Any]:
    """The scaled voxels as float32, read straight from an in-memory file when possible.

    For an image made by :func:`_read_image` from bytes, the voxels are viewed
    in place with ``np.frombuffer`` and converted once (``native`` and no
    scaling: not converted at all); nibabel's array proxy would first copy them
    out of the file object. Other images (and dtypes that need nibabel's
    handling) go through the proxy.
    """
    holder = img.file_map.get("image")
    stream = getattr(holder, "fileobj", None)
    proxy = img.dataobj
    dtype = np.dtype(getattr(proxy, "dtype", img.header.get_data_dtype()))
    offset = getattr(proxy, "offset", None)
    order = getattr(proxy, "order", "F")
    if (
        isinstance(stream, io.BytesIO)
        and offset is not None
        and dtype.kind in "iuf"
        and dtype.fields is None
    ):
        shape = proxy.shape
        count = math.prod(shape)
        buffer = stream.getbuffer()
        if offset + count * dtype.itemsize <= len(buffer):
            raw = np.frombuffer(buffer, dtype=dtype, count=count, offset=int(offset))
            slope, inter = float(proxy.slope), float(proxy.inter)
            if native and slope == 1.0 and inter == 0.0:
                return raw.reshape(shape, order=order)
            data = raw.reshape(shape, order=order).astype(np.float32)
            if slope != 1.0:
                data *= np.float32(slope)
            if inter != 0.0:
                data += np.float32(inter)
            return data
    if native and getattr(proxy, "is_proxy", False) and not _scaled(proxy):
        return np.asanyarray(proxy)
    # asarray with a dtype scales in float32: get_fdata would build a
    # float64 copy twice the size of what we keep.
    return np.asarray(img.dataobj, dtype=np.float32)


def _scaled(proxy: Any) -> bool:
    slope, inter = getattr(proxy, "slope", 1.0), getattr(proxy, "inter", 0.0)
    return not (float(slope) == 1.0 and float(inter) == 0.0)


def _read_image(name: str) -> nib.spatialimages.SpatialImage:
    """The image at ``name``: gzip files are inflated in memory in one call."""
    if not name.endswith(".gz"):
        return nib.load(name)
    with open(name, "rb") as handle:
        raw = handle.read()
    data = _gunzip(raw)
    klass = nib.Nifti2Image if _is_nifti2(data) else nib.Nifti1Image
    try:
        return klass.from_bytes(data)
    except _DECODE_ERRORS:
        # Not a single-file NIfTI: let nibabel say what the file is.
        return nib.load(name)


def _is_nifti2(data: bytes) -> bool:
    """Whether the header size field (either byte order) says NIfTI-2 (540) rather than 348."""
    head = data[:4]
    return 540 in (int.from_bytes(head, "little"), int.from_bytes(head, "big"))


def _reason(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def _check_affine(name: str, affine: NDArray[np.float64]) -> None:
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise DataError(
            f"{name}: the affine (voxel-to-world matrix) is not finite; "
            "fix the sform/qform of the file"
        )
    linear = affine[:3, :3]
    scale = float(np.abs(linear).max())
    # Relative test: a 1 mm and a 1 um voxel grid are both legitimate.
    if scale == 0.0 or abs(float(np.linalg.det(linear))) <= (1e-6 * scale) ** 3:
        raise DataError(
            f"{name}: the affine (voxel-to-world matrix) is singular, so the orientation "
            "is unknown; fix the sform/qform of the file"
        )


def save_nifti(
    path: str | os.PathLike[str],
    data: ArrayLike,
    affine: ArrayLike,
    *,
    tr: float | None = None,
) -> str:
    """Write ``data`` as a NIfTI-1 file (gzip-compressed when the name ends in ``.gz``).

    The data type is kept (an int16 array is stored as int16), the affine is
    written as both sform and qform with the "scanner" code, and units are mm
    and seconds.

    Args:
        path: Target file, usually ``*.nii.gz``. Parent folders are created.
        data: Array in file layout.
        affine: 4x4 voxel-to-world matrix.
        tr: Repetition time in seconds, stored in ``pixdim[4]`` of 4D images.

    Returns:
        The path written, as a string.
    """
    name = os.fspath(path)
    array = np.asanyarray(data)
    matrix = np.asarray(affine, dtype=np.float64)
    img = nib.Nifti1Image(array, matrix)
    img.set_sform(matrix, code=1)
    img.set_qform(matrix, code=1)
    img.header.set_xyzt_units("mm", "sec")
    if tr is not None and array.ndim >= 4:
        zooms = list(img.header.get_zooms())
        zooms[3] = float(tr)
        img.header.set_zooms(zooms)
    parent = os.path.dirname(name)
    if parent:
        os.makedirs(parent, exist_ok=True)
    nib.save(img, name)
    return name


def reorient(
    data: NDArray[np.generic],
    affine: ArrayLike,
    axcodes: Sequence[str] = RAS,
) -> tuple[NDArray[np.generic], NDArray[np.float64]]:
    """Permute and flip the first three axes of ``data`` to ``axcodes``.

    The world position of every voxel is unchanged: the returned affine maps
    the new voxel grid to the same world coordinates. Oblique affines go to the
    closest orientation, like :func:`nibabel.as_closest_canonical`.

    Args:
        data: Array with at least three dimensions; trailing axes are left alone.
        affine: 4x4 voxel-to-world matrix of ``data``.
        axcodes: Target codes, e.g. ``("L", "P", "S")``.

    Returns:
        ``(data, affine)``; ``data`` may be a view with negative strides.
    """
    matrix = np.asarray(affine, dtype=np.float64)
    start = nio.io_orientation(matrix)
    transform = nio.ornt_transform(start, nio.axcodes2ornt(tuple(axcodes)))
    if np.array_equal(transform, [[0, 1], [1, 1], [2, 1]]):
        return data, matrix
    new_data = nio.apply_orientation(data, transform)
    new_affine = matrix @ nio.inv_ornt_aff(transform, data.shape[:3])
    return new_data, new_affine


# ---------------------------------------------------------------------------
# Resampling and intensity
# ---------------------------------------------------------------------------

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
    head = mask if mask is not None else volume > lo + float(foreground) * (hi - lo)
    # Masked sums as dot products with a 0/1 float copy of the mask: numpy's
    # boolean indexing and where= reductions are several times slower.
    # One flattening order for every operand (volume's own, so it is a view).
    order = "F" if volume.flags.f_contiguous and not volume.flags.c_contiguous else "C"
    weight = head.astype(np.float32).ravel(order=order)
    count = float(weight.sum())
    if count == 0.0:
        out[...] = 0.0
        return out
    flat = volume.ravel(order=order)
    mean = float(np.dot(flat, weight)) / count
    # where, not a product with the mask: that would leave -0.0 outside.
    centred = np.where(head, volume - np.float32(mean), np.float32(0.0))
    spread = centred.ravel(order=order)
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


# ---------------------------------------------------------------------------
# Phantom building blocks
# ---------------------------------------------------------------------------


@attrs.frozen(eq=False)
class HeadPhantom:
    """A smooth synthetic head on a RAS voxel grid.

    The tissue maps are partial-volume fractions in [0, 1] (they sum to at most
    1 per voxel; the remainder is air or bone). World ``x = 0`` is the
    mid-sagittal plane: negative ``x`` is the left hemisphere.

    Attributes:
        affine: 4x4 RAS voxel-to-world matrix (mm).
        wm: White-matter fraction.
        gm: Grey-matter fraction (a folded cortical ribbon).
        csf: Cerebrospinal fluid (around the brain and in the ventricles).
        scalp: Scalp and subcutaneous fat, outside the skull.
        brain_radii: Semi-axes of the brain in mm along x, y and z.
    """

    affine: NDArray[np.float64]
    wm: NDArray[np.float32]
    gm: NDArray[np.float32]
    csf: NDArray[np.float32]
    scalp: NDArray[np.float32]
    brain_radii: tuple[float, float, float]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.wm.shape)  # type: ignore[return-value]

    @property
    def brain(self) -> NDArray[np.float32]:
        """Brain tissue fraction (grey plus white matter)."""
        return self.wm + self.gm

    def image(self, contrasts: Mapping[str, float]) -> NDArray[np.float32]:
        """Mix the tissue maps with one intensity per tissue (missing tissues are 0).

        Args:
            contrasts: Intensity per tissue name: ``wm``, ``gm``, ``csf``, ``scalp``.
        """
        known = {"wm", "gm", "csf", "scalp"}
        unknown = set(contrasts) - known
        if unknown:
            raise ValueError(f"unknown tissues {sorted(unknown)}; known: {sorted(known)}")
        out = np.zeros(self.shape, dtype=np.float32)
        for tissue, value in contrasts.items():
            out += np.float32(value) * getattr(self, tissue)
        return out


def world_grid(shape: Sequence[int], affine: ArrayLike) -> NDArray[np.float32]:
    """World coordinates (mm) of every voxel centre, shape ``(*shape[:3], 3)``."""
    matrix = np.asarray(affine, dtype=np.float64)
    axes = [np.arange(n, dtype=np.float64) for n in shape[:3]]
    ijk = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
    return (ijk @ matrix[:3, :3].T + matrix[:3, 3]).astype(np.float32)


def _soft(distance: NDArray[np.float32], width: float) -> NDArray[np.float32]:
    # A logistic edge rising from 10 % to 90 % over about ``width``: partial
    # volume at tissue borders instead of staircase aliasing.
    width = width / 4.4
    scaled = np.clip(-distance / np.float32(width), -60.0, 60.0)  # exp overflows past ~88
    return (1.0 / (1.0 + np.exp(scaled))).astype(np.float32)


def _folding(
    rng: np.random.Generator, direction: NDArray[np.float32], amplitude: float, waves: int = 12
) -> NDArray[np.float32]:
    """A smooth random function on the sphere of directions, for gyri and sulci."""
    out = np.zeros(direction.shape[:-1], dtype=np.float32)
    for _ in range(waves):
        frequency = rng.normal(size=3)
        frequency *= rng.uniform(6.0, 12.0) / np.linalg.norm(frequency)
        phase = rng.uniform(0.0, 2.0 * np.pi)
        out += np.sin(direction @ frequency.astype(np.float32) + np.float32(phase))
    return out * np.float32(amplitude / math.sqrt(waves / 2.0))


def head_phantom(
    rng: np.random.Generator,
    shape: Sequence[int],
    voxel_size: Sequence[float],
    *,
    fill: float = 0.85,
    position_jitter: float = 0.5,
    size_jitter: float = 0.02,
) -> HeadPhantom:
    """Build a smooth, subject-specific synthetic head.

    An ellipsoidal head (scalp, skull, CSF) around a brain with a folded
    cortical ribbon, white matter and two ventricles. Head size, position in the
    field of view and folding pattern vary with ``rng``; the head centre is at
    world ``(0, 0, 0)``. The default jitter is small, as in images aligned to a
    template: the demo's few training steps must go to the finding, not to
    head placement.

    Args:
        rng: Source of randomness (the phantom is a function of its state).
        shape: Grid size ``(X, Y, Z)``.
        voxel_size: Voxel size in mm along each axis.
        fill: Fraction of the field of view the head spans along each axis.
        position_jitter: Largest offset of the head from the centre of the
            field of view, in voxels per axis.
        size_jitter: Largest relative change of the head's semi-axes.

    Returns:
        A :class:`HeadPhantom` on a RAS grid.
    """
    dims = tuple(int(s) for s in shape[:3])
    zooms = np.asarray(voxel_size, dtype=np.float64)[:3]
    fov = np.asarray(dims) * zooms
    shift = rng.uniform(-position_jitter, position_jitter, size=3) * zooms
    affine = np.eye(4)
    affine[:3, :3] = np.diag(zooms)
    affine[:3, 3] = -(np.asarray(dims) - 1) / 2.0 * zooms + shift

    head = fov * fill / 2.0 * rng.uniform(1.0 - size_jitter, 1.0 + size_jitter, size=3)
    xyz = world_grid(dims, affine)
    scaled = xyz / head.astype(np.float32)
    r = np.sqrt(np.sum(scaled * scaled, axis=-1))
    direction = scaled / np.maximum(r, 1e-3)[..., None]
    width = float(zooms.min() / head.min())  # about one voxel, in units of r

    brain_edge = 0.86 + _folding(rng, direction, 0.025)
    white_edge = brain_edge - 0.13 + _folding(rng, direction, 0.045)
    inside_head = _soft(1.0 - r, width)
    inside_skull = _soft(0.93 - r, width)
    brain = _soft(brain_edge - r, width)
    white = _soft(white_edge - r, width)

    # Two ventricles, mirror images across the mid-sagittal plane.
    ventricles = np.zeros(dims, dtype=np.float32)
    vent_radii = np.array([0.09, 0.28, 0.14], dtype=np.float32) * rng.uniform(0.85, 1.2)
    for side in (-1.0, 1.0):
        centre = np.array([0.11 * side, -0.02, 0.08], dtype=np.float32)
        d = np.sqrt(np.sum(((scaled - centre) / vent_radii) ** 2, axis=-1))
        ventricles = np.maximum(ventricles, _soft(1.0 - d, width / vent_radii.min()))

    wm = white * (1.0 - ventricles)
    gm = brain - white
    csf = (inside_skull - brain) + white * ventricles
    scalp = inside_head - _soft(0.965 - r, width)
    return HeadPhantom(
        affine=affine,
        wm=wm.astype(np.float32),
        gm=np.clip(gm, 0.0, 1.0).astype(np.float32),
        csf=np.clip(csf, 0.0, 1.0).astype(np.float32),
        scalp=np.clip(scalp, 0.0, 1.0).astype(np.float32),
        brain_radii=tuple(float(h * 0.86) for h in head),  # type: ignore[arg-type]
    )


def hemisphere_centre(
    rng: np.random.Generator,
    phantom: HeadPhantom,
    side: str,
    *,
    depth: tuple[float, float] = (0.3, 0.55),
) -> NDArray[np.float64]:
    """A random world point (mm) inside the ``left`` or ``right`` hemisphere.

    The lateral offset is a fraction ``depth`` of the brain's half-width, so the
    point stays off the midline and inside the brain; the anterior-posterior and
    superior-inferior positions vary too.

    Args:
        rng: Source of randomness.
        phantom: The head the point lies in.
        side: ``"left"`` (world x < 0) or ``"right"`` (world x > 0).
        depth: Range of the lateral offset, as a fraction of the brain half-width.
    """
    sign = {"left": -1.0, "right": 1.0}.get(str(side).lower())
    if sign is None:
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    rx, ry, rz = phantom.brain_radii
    return np.array(
        [
            sign * rng.uniform(*depth) * rx,
            rng.uniform(-0.35, 0.35) * ry,
            rng.uniform(-0.25, 0.35) * rz,
        ]
    )


def hemisphere_mask(phantom: HeadPhantom, side: str) -> NDArray[np.float32]:
    """A soft mask of one side of the mid-sagittal plane (world x = 0).

    Multiplying a lesion's surroundings by it keeps them in their hemisphere,
    as the falx does for oedema.

    Args:
        phantom: The head whose grid the mask is on.
        side: ``"left"`` (world x < 0) or ``"right"`` (world x > 0).
    """
    sign = {"left": -1.0, "right": 1.0}.get(str(side).lower())
    if sign is None:
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    x = world_grid(phantom.shape, phantom.affine)[..., 0]
    voxel = float(np.sqrt((phantom.affine[:3, :3] ** 2).sum(axis=0)).min())
    return _soft(np.float32(sign) * x, voxel)


def blob(
    shape: Sequence[int],
    affine: ArrayLike,
    centre: Sequence[float],
    radius: float,
) -> NDArray[np.float32]:
    """A soft-edged sphere in world coordinates: 1 inside, 0 outside.

    Args:
        shape: Grid size ``(X, Y, Z)``.
        affine: Voxel-to-world matrix of the grid.
        centre: Sphere centre in world mm.
        radius: Sphere radius in mm.

    Returns:
        A float32 weight map of ``shape`` with an edge about one voxel wide.
    """
    matrix = np.asarray(affine, dtype=np.float64)
    xyz = world_grid(shape, matrix)
    distance = np.sqrt(np.sum((xyz - np.asarray(centre, dtype=np.float32)) ** 2, axis=-1))
    voxel = float(np.sqrt((matrix[:3, :3] ** 2).sum(axis=0)).min())
    return _soft(np.float32(radius) - distance, voxel)


def bias_field(
    rng: np.random.Generator, shape: Sequence[int], strength: float = 0.1
) -> NDArray[np.float32]:
    """A smooth multiplicative intensity inhomogeneity around 1 (receive-coil bias).

    Args:
        rng: Source of randomness.
        shape: Grid size ``(X, Y, Z)``.
        strength: Rough relative amplitude (0.1 is about +-10 %).
    """
    axes = [np.linspace(-1.0, 1.0, int(n), dtype=np.float32) for n in shape[:3]]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    linear = rng.normal(size=3) * strength / 2.0
    quadratic = rng.normal(size=3) * strength / 3.0
    log_field = (
        linear[0] * x
        + linear[1] * y
        + linear[2] * z
        + quadratic[0] * x * x
        + quadratic[1] * y * y
        + quadratic[2] * z * z
    )
    return np.exp(log_field).astype(np.float32)


def rician_noise(rng: np.random.Generator, image: ArrayLike, sigma: float) -> NDArray[np.float32]:
    """Magnitude of ``image`` plus complex Gaussian noise, as in MR magnitude images.

    The background gets the Rayleigh floor real scans have instead of zeros.
    """
    data = np.asarray(image, dtype=np.float32)
    real = data + rng.normal(0.0, sigma, size=data.shape).astype(np.float32)
    imag = rng.normal(0.0, sigma, size=data.shape).astype(np.float32)
    return np.sqrt(real * real + imag * imag)


def random_orientation(
    rng: np.random.Generator,
    choices: Sequence[tuple[str, str, str]] = PHANTOM_ORIENTATIONS,
) -> tuple[str, str, str]:
    """Pick the orientation a phantom is written in (see :data:`PHANTOM_ORIENTATIONS`)."""
    return tuple(choices[int(rng.integers(len(choices)))])  # type: ignore[return-value]
