"""Reading and writing NIfTI: bounded, checked decoding, and reorientation to RAS.

Part of :mod:`umbrella_core.imaging`, which re-exports every public name.
"""

from __future__ import annotations

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
from umbrella_core.imaging.files import missing_file_message, open_regular
from umbrella_core.imaging.header import REEXPORT, check_affine, inflate, read_nifti_header

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


# ---------------------------------------------------------------------------
# Reading and writing
# ---------------------------------------------------------------------------


def as_paths(paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> tuple[str, ...]:
    """The file(s) a loader was given, as a tuple of strings (one path or several)."""
    if isinstance(paths, (str, os.PathLike)):
        return (os.fspath(paths),)
    return tuple(os.fspath(p) for p in paths)


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
        DataError: The file is missing, is not a regular file, is not a
            single-file NIfTI image, fails
            :func:`~umbrella_core.imaging.header.read_nifti_header` (checked
            before anything is allocated: not 3D or 4D, complex or RGB voxels,
            scaling that overflows float32, more voxels than the ceilings or
            than the file holds), cannot be decoded (truncated or corrupt gzip,
            a gzip stream inflating past the header's image), holds NaN or
            infinite voxels, or has a non-finite or singular affine. The
            message names the file.
    """
    name = os.fspath(path)
    img = _open_nifti(name)
    affine = np.asarray(img.affine, dtype=np.float64)
    check_affine(name, affine)
    data = _decoded_voxels(name, img, native=native)
    data, affine = reorient(data, affine, RAS)
    if native:
        return data, affine
    # Flips are negative-stride views, which torch.from_numpy refuses. Copy
    # them in the file's own memory order ("K"): turning NIfTI's x-fastest
    # layout into C order would be a full transpose, slower than the decode.
    if any(step < 0 for step in data.strides):
        data = np.array(data, order="K")
    return data, affine


def _open_nifti(name: str) -> nib.Nifti1Image | nib.Nifti2Image:
    """The file's NIfTI image, its header checked and its voxels not yet read."""
    # Before any voxel: what the header shows (non-regular files, pairs,
    # types, overflowing scaling, voxel ceilings, more voxels than the file holds).
    facts = read_nifti_header(name)
    try:
        img = _read_image(name, facts.expected, gzipped=facts.gzipped)
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
    return img


def _decoded_voxels(
    name: str, img: nib.spatialimages.SpatialImage, *, native: bool
) -> NDArray[Any]:
    """The image's voxels as :func:`load_nifti` keeps them, checked: 3D+, not empty, finite."""
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
    # Integers whose scaled range fits float32 cannot be NaN or infinite: skip
    # the scan (read_nifti_header refuses scaling that overflows; scan anyway
    # should that ever change).
    finite = True if _integers_fit_float32(img) else np.isfinite(data)
    # mypy: past `is not True`, finite is np.isfinite's array.
    if finite is not True and not finite.all():  # type: ignore[union-attr]
        bad = int(data.size - np.count_nonzero(finite))
        raise DataError(
            f"{name}: {bad} of {data.size} voxels are NaN or infinite; replace them "
            "(e.g. fslmaths IN -nan OUT) or re-export the file"
        )
    return data


def _integers_fit_float32(img: nib.spatialimages.SpatialImage) -> bool:
    """Whether the image stores integers whose scaled range is finite in float32."""
    dtype = np.dtype(img.get_data_dtype())
    if dtype.kind not in "iu":
        return False
    # mypy: nibabel types img.header as SpatialHeader; a NIfTI header has get_slope_inter.
    slope, inter = img.header.get_slope_inter()  # type: ignore[attr-defined]
    if slope is None:
        return True
    info = np.iinfo(dtype)
    inter = inter or 0.0
    ends = (float(slope) * float(info.min) + inter, float(slope) * float(info.max) + inter)
    limit = float(np.finfo(np.float32).max)
    return all(abs(end) <= limit for end in ends)


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
        # getvalue hands back the bytes the stream was made from; getbuffer
        # would first copy them (a second inflated image in memory).
        buffer = stream.getvalue()
        if offset + count * dtype.itemsize <= len(buffer):
            raw = np.frombuffer(buffer, dtype=dtype, count=count, offset=int(offset))
            # mypy: nibabel types dataobj as ArrayLike; with an offset it is an ArrayProxy.
            slope, inter = float(proxy.slope), float(proxy.inter)  # type: ignore[attr-defined]
            if native and slope == 1.0 and inter == 0.0:
                # Callers may normalise in place: views of the read-only bytes
                # are copied here, the only path that needs a second buffer.
                # mypy: the proxy's shape and order ("C"/"F") are untyped to numpy's stubs.
                return raw.reshape(shape, order=order).copy(order="K")  # type: ignore[arg-type]
            data = raw.reshape(shape, order=order).astype(np.float32)  # type: ignore[arg-type]
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


def _read_image(name: str, expected: int, *, gzipped: bool) -> nib.spatialimages.SpatialImage:
    """The image at ``name``, a single-file NIfTI whose voxels end at byte ``expected``.

    Gzip files (by content, whatever the name) are inflated in memory in one
    call, bounded by ``expected`` (:func:`~umbrella_core.imaging.header.inflate`).
    A plain file named otherwise than ``.nii`` (a ``.nii.gz`` that was never
    compressed), which nibabel would take by its name, is read up to ``expected``.
    """
    if not gzipped and name.lower().endswith(".nii"):
        # mypy: nib.load types any image; a single .nii file is a Nifti1Image (SpatialImage).
        return nib.load(name)  # type: ignore[return-value]
    with open_regular(name) as handle:
        raw = handle.read() if gzipped else handle.read(expected)
    data = inflate(name, raw, expected) if gzipped else raw
    del raw
    klass = nib.Nifti2Image if _is_nifti2(data) else nib.Nifti1Image
    return klass.from_bytes(data)


def _is_nifti2(data: bytes) -> bool:
    """Whether the header size field (either byte order) says NIfTI-2 (540) rather than 348."""
    head = data[:4]
    return 540 in (int.from_bytes(head, "little"), int.from_bytes(head, "big"))


def _reason(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


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
