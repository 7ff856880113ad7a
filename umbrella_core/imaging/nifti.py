"""Reading and writing NIfTI: bounded, checked decoding, and reorientation to RAS.

Part of :mod:`umbrella_core.imaging`, which re-exports every public name.
"""

from __future__ import annotations

import gzip
import io
import math
import os
import zlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import nibabel as nib
import numpy as np
from nibabel import orientations as nio

from umbrella_core.errors import DataError

if TYPE_CHECKING:  # pragma: no cover
    from numpy.typing import ArrayLike, NDArray

#: Axis codes of the canonical orientation every loader returns: the first axis
#: increases to the Right, the second to the Anterior, the third to the Superior.
RAS: tuple[str, str, str] = ("R", "A", "S")

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
