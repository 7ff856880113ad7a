"""What a NIfTI header alone tells, and the bounds on what a file may make a loader allocate.

Part of :mod:`umbrella_core.imaging`. :func:`read_nifti_header` reads at most
the first 544 bytes of an image (inflating only those from a ``.nii.gz``) and
refuses, naming the file, everything a header shows to be unusable before a
voxel is decoded: files that are not regular files (a FIFO would block, a
``/dev/zero`` never ends), NIfTI pairs (``.hdr``/``.img``, gzipped or not),
images that are not 3D or 4D, complex or RGB voxels, scaling that overflows
float32, more voxels than the ceilings below, and more voxels than the file
can hold. Whether a file is gzipped is read from its first bytes, not its
name: a plain NIfTI named ``.nii.gz`` (or a gzipped one named ``.nii``) is
read as what it is. A file that is something else (DICOM, MGH, a picture,
text, a folder of DICOM files) is named as such, with how to convert it
(:mod:`umbrella_core.imaging.formats`). The checks before training (``data.check=files``) and
:func:`~umbrella_core.imaging.load_nifti` both run it, so memory follows what
the file holds, never only what its header claims. :func:`inflate` then
decompresses a ``.nii.gz`` with a bound: never more than the header's image
plus :data:`INFLATE_MARGIN`.
"""

from __future__ import annotations

import math
import os
import zlib
from typing import Any

import attrs
import nibabel as nib
import numpy as np

from umbrella_core.errors import ConfigError, DataError
from umbrella_core.imaging.files import open_regular
from umbrella_core.imaging.formats import foreign_format

__all__ = [
    "MAX_VOLUME_VOXELS",
    "MAX_VOXELS",
    "DEFLATE_MAX_RATIO",
    "INFLATE_MARGIN",
    "NiftiHeader",
    "voxel_ceilings",
    "read_nifti_header",
    "inflate",
    "REEXPORT",
    "check_affine",
]

#: What to do about a file that does not decode.
REEXPORT = "the file is truncated or corrupt: copy or re-export it"


#: Most voxels one 3D volume may have (512^3, 0.5 GiB as float32; a 0.5 mm
#: whole-head 7T scan has about a third of it). The environment variable
#: ``UMBRELLA_MAX_VOLUME_VOXELS`` changes it.
MAX_VOLUME_VOXELS = 512**3

#: Most voxels a whole image (all frames of a series) may have: 2^31, 8 GiB as
#: float32 (an HCP 7T resting-state run has 1.3 x 10^9). The environment
#: variable ``UMBRELLA_MAX_VOXELS`` changes it.
MAX_VOXELS = 2**31

#: Deflate cannot inflate one byte to more than 1032 (zlib's FAQ): a ``.nii.gz``
#: smaller than its header's image over this ratio is truncated or lies.
DEFLATE_MAX_RATIO = 1032

#: Bytes a ``.nii.gz`` may inflate to beyond its header's image (some writers
#: pad the end); more is a gzip bomb or a wrong header.
INFLATE_MARGIN = 1 << 20

# NIfTI-2 headers are 540 bytes, NIfTI-1 348; both are followed by 4 extension bytes.
_HEAD_BYTES = 544
_PAIR_SUFFIXES = (".hdr", ".img", ".hdr.gz", ".img.gz")
_GZIP_MAGIC = b"\x1f\x8b"
_FLOAT32_MAX = float(np.finfo(np.float32).max)


@attrs.frozen
class NiftiHeader:
    """A single-file NIfTI header that passed :func:`read_nifti_header`.

    Attributes:
        path: The file.
        header: nibabel's ``Nifti1Header`` or ``Nifti2Header``.
        gzipped: Whether the file is gzip-compressed (by its first bytes,
            whatever its name says).
        shape: The image's shape (3 or 4 dimensions).
        dtype: The stored voxel type.
        offset: Where the voxels start in the (inflated) file.
        size: The file's size in bytes (compressed, for a ``.nii.gz``).
    """

    path: str
    header: Any
    gzipped: bool
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    offset: int
    size: int

    @property
    def expected(self) -> int:
        """Bytes of the (inflated) file up to the end of the voxels."""
        return self.offset + math.prod(self.shape) * self.dtype.itemsize


def voxel_ceilings() -> tuple[int, int]:
    """``(per volume, per image)``: :data:`MAX_VOLUME_VOXELS` and :data:`MAX_VOXELS`,
    or the environment's ``UMBRELLA_MAX_VOLUME_VOXELS`` / ``UMBRELLA_MAX_VOXELS``."""
    values = []
    for variable, default in (
        ("UMBRELLA_MAX_VOLUME_VOXELS", MAX_VOLUME_VOXELS),
        ("UMBRELLA_MAX_VOXELS", MAX_VOXELS),
    ):
        text = os.environ.get(variable, "").strip()
        if not text:
            values.append(default)
            continue
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value <= 0:
            raise ConfigError(f"{variable}={text!r}: expected a positive whole number of voxels")
        values.append(value)
    return values[0], values[1]


def check_affine(name: str, affine: Any) -> None:
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


def read_nifti_header(path: str | os.PathLike[str]) -> NiftiHeader:
    """The header of a single-file NIfTI image, refusing what it shows to be unusable.

    Cheap: at most the first 544 bytes are read (inflated, for ``.nii.gz``)
    and the file's size is taken; no voxel is decoded.

    Raises:
        DataError: One message, naming the file, for the first problem found
            (see the module's docstring).
    """
    name = os.fspath(path)
    lowered = name.lower()
    if lowered.endswith(_PAIR_SUFFIXES):
        raise DataError(_pair_message(name))
    with open_regular(name) as handle:
        size = os.fstat(handle.fileno()).st_size
        if size == 0:
            raise DataError(
                f"{name}: the file is empty (0 bytes), as an interrupted copy or export "
                "leaves it; copy or re-export it"
            )
        # By content, not name: a plain NIfTI named .nii.gz is read as it is.
        gzipped = handle.read(2) == _GZIP_MAGIC
        handle.seek(0)
        try:
            head = _read_head(handle, gzipped)
        except (OSError, EOFError, zlib.error) as error:
            raise DataError(
                f"{name}: not a readable NIfTI file ({_reason(error)}); {REEXPORT}"
            ) from None
    header = _parse(name, head, gzipped)
    shape = _shape(name, header)
    dtype = _dtype(name, header)
    header_facts = NiftiHeader(
        name, header, gzipped, shape, dtype, int(header.get_data_offset()), size
    )
    _check_ceilings(name, shape)
    _check_payload(header_facts)
    _check_scaling(name, header, dtype)
    try:
        affine = np.asarray(header.get_best_affine(), dtype=np.float64)
    except Exception as error:  # nibabel raises several kinds for broken qforms
        raise DataError(
            f"{name}: the affine (voxel-to-world matrix) cannot be read ({_reason(error)}); "
            "fix the sform/qform of the file"
        ) from None
    check_affine(name, affine)
    return header_facts


def inflate(name: str, raw: bytes, expected: int) -> bytes:
    """The gzip data ``raw`` of ``name`` inflated, never to more than ``expected + INFLATE_MARGIN``.

    With ISA-L when it is installed (about twice as fast as zlib, and
    inflating in one call avoids nibabel's small streaming reads).
    Concatenated gzip members are inflated in turn; zero padding after the last
    is allowed, as gzip allows it.

    Raises:
        DataError: The data inflate to more (a gzip bomb or a wrong header),
            end early or are corrupt (truncated), or inflate to less than
            ``expected``.
    """
    try:
        from isal import isal_zlib as inflater_module
    except ImportError:  # pragma: no cover - isal is a dependency; zlib is the fallback
        # mypy: isal_zlib and zlib are one interface (the ImportError fallback).
        inflater_module = zlib  # type: ignore[misc]
    limit = expected + INFLATE_MARGIN
    parts: list[bytes] = []
    total = 0
    rest = raw
    while True:
        inflater = inflater_module.decompressobj(31)
        try:
            # One byte over the limit tells "more" from "exactly the limit".
            part = inflater.decompress(rest, limit - total + 1)
        except Exception as error:  # zlib.error, or ISA-L's IsalError (not a zlib.error)
            raise DataError(
                f"{name}: cannot decode the image data ({_reason(error)}); {REEXPORT}"
            ) from None
        parts.append(part)
        total += len(part)
        if total > limit:
            raise DataError(
                f"{name}: the gzip data inflate to more than the {expected:,} bytes its "
                "header's image needs (a gzip bomb, or a wrong header); re-export the file"
            )
        if not inflater.eof:
            raise DataError(
                f"{name}: cannot decode the image data (the gzip data end early); {REEXPORT}"
            )
        rest = inflater.unused_data
        if not rest.strip(b"\0"):
            break
    data = parts[0] if len(parts) == 1 else b"".join(parts)
    if len(data) < expected:
        raise DataError(
            f"{name}: cannot decode the image data (the header's image needs {expected:,} "
            f"bytes, the gzip data hold {len(data):,}); {REEXPORT}"
        )
    return data


def _read_head(handle: Any, gzipped: bool) -> bytes:
    if not gzipped:
        return handle.read(_HEAD_BYTES)
    inflater = zlib.decompressobj(31)
    head = b""
    while len(head) < _HEAD_BYTES and not inflater.eof:
        chunk = handle.read(1 << 14)
        if not chunk:
            break
        head += inflater.decompress(inflater.unconsumed_tail + chunk, _HEAD_BYTES - len(head))
    return head


def _nifti_magic(head: bytes, sizes: set[int]) -> bytes:
    """The NIfTI magic where the header size says it is (b'' when none)."""
    where = slice(4, 8) if 540 in sizes else slice(344, 348)
    magic = head[where].rstrip(b"\0")
    return magic if magic in (b"n+1", b"ni1", b"n+2", b"ni2") else b""


def _parse(name: str, head: bytes, gzipped: bool) -> Any:
    sizes = {int.from_bytes(head[:4], order) for order in ("little", "big")}
    klass = nib.Nifti2Header if 540 in sizes else nib.Nifti1Header
    if not (sizes & {348, 540} and _nifti_magic(head, sizes)):
        # Not a NIfTI header: say what it is when that is known. (DICOM's
        # preamble is free: nibabel's own 0.dcm starts with 348.)
        found = foreign_format(head)
        if found is not None:
            what, advice = found
            if what.startswith("text"):
                raise DataError(f"{name}: not a readable NIfTI file: it holds {what}; {advice}")
            packed = " (gzip-compressed)" if gzipped and "gzip" not in what else ""
            raise DataError(f"{name}: not a NIfTI file: it is {what}{packed}; {advice}")
    if not sizes & {348, 540} and head[344:347] in (b"n+1", b"ni1"):
        size = int.from_bytes(head[:4], "little")
        raise DataError(
            f"{name}: not a readable NIfTI file (the header's sizeof_hdr is {size}, not 348: "
            f"the header is damaged); {REEXPORT}"
        )
    if not sizes & {348, 540} and not name.lower().endswith((".nii", ".nii.gz")):
        raise DataError(
            f"{name}: not a NIfTI file; convert it to NIfTI (.nii or .nii.gz), e.g. with "
            "dcm2niix or mri_convert"
        )
    if len(head) < klass.template_dtype.itemsize:
        raise DataError(
            f"{name}: not a readable NIfTI file ({len(head)} bytes, shorter than a NIfTI "
            f"header); {REEXPORT}"
        )
    if not sizes & {348, 540}:
        raise DataError(
            f"{name}: not a readable NIfTI file (no NIfTI header at its start); {REEXPORT}"
        )
    try:
        header = klass(head[: klass.template_dtype.itemsize], check=True)
    except Exception as error:  # nibabel raises several kinds for broken headers
        raise DataError(
            f"{name}: not a readable NIfTI file ({_reason(error)}); {REEXPORT}"
        ) from None
    magic = bytes(header["magic"]).rstrip(b"\0")
    if magic in (b"ni1", b"ni2"):
        raise DataError(_pair_message(name, inside=True))
    if magic not in (b"n+1", b"n+2"):
        raise DataError(
            f"{name}: not a NIfTI file (an Analyze 7.5 header, or no NIfTI magic); convert "
            "it to NIfTI (.nii or .nii.gz), e.g. with dcm2niix or nibabel"
        )
    return header


def _pair_message(name: str, *, inside: bool = False) -> str:
    what = "holds the header of" if inside else "is part of"
    return (
        f"{name}: {what} a NIfTI pair (.hdr + .img), which UMBRELLA does not read; "
        "convert the pair to one .nii.gz (e.g. nibabel: nib.save(nib.load('x.hdr'), "
        "'x.nii.gz')) and give that file"
    )


def _shape(name: str, header: Any) -> tuple[int, ...]:
    dim = [int(d) for d in header["dim"]]
    if not 1 <= dim[0] <= 7:
        raise DataError(f"{name}: not a readable NIfTI file (dim[0] is {dim[0]}); re-export it")
    shape = tuple(dim[1 : dim[0] + 1])
    if len(shape) not in (3, 4):
        raise DataError(
            f"{name}: expected a 3D or 4D image, got a {len(shape)}D image of shape {shape}; "
            "give one volume or one series (split the extra dimensions into files)"
        )
    if min(shape) < 0:
        raise DataError(
            f"{name}: not a readable NIfTI file (the header's dim has a negative size, shape "
            f"{shape}: the header is damaged); re-export the file"
        )
    if min(shape) == 0:
        raise DataError(
            f"{name}: image is empty (a dimension of size 0, shape {shape}); re-export the file"
        )
    return shape


def _dtype(name: str, header: Any) -> np.dtype[Any]:
    code = int(header["datatype"])
    try:
        dtype = np.dtype(header.get_data_dtype())
    except Exception:  # an unknown datatype code
        raise DataError(
            f"{name}: unknown voxel type (NIfTI datatype code {code}); re-export the file"
        ) from None
    label = nib.nifti1.data_type_codes.label.get(code, dtype.name)
    if dtype.fields is not None:
        raise DataError(
            f"{name}: holds colour voxels ({label}), not intensities; convert it to one "
            "grey-scale channel (e.g. float32) and re-export"
        )
    if dtype.kind == "c":
        raise DataError(
            f"{name}: holds complex-valued voxels ({label}); store the magnitude as float32 "
            "and re-export"
        )
    if dtype.kind not in "iuf":
        raise DataError(f"{name}: voxel type {label} is not supported; re-export as float32")
    return dtype


def _check_ceilings(name: str, shape: tuple[int, ...]) -> None:
    per_volume, per_image = voxel_ceilings()
    volume, total = math.prod(shape[:3]), math.prod(shape)
    size = "x".join(str(s) for s in shape)
    if volume > per_volume:
        raise DataError(
            f"{name}: the header claims a {size} image ({volume:,} voxels per volume), over "
            f"the ceiling of {per_volume:,}; fix the header, or raise "
            "UMBRELLA_MAX_VOLUME_VOXELS if the volume is real"
        )
    if total > per_image:
        raise DataError(
            f"{name}: the header claims a {size} image ({total:,} voxels), over the "
            f"ceiling of {per_image:,}; fix the header, or raise UMBRELLA_MAX_VOXELS if "
            "the series is real"
        )


def _check_payload(facts: NiftiHeader) -> None:
    name, expected, size = facts.path, facts.expected, facts.size
    if not facts.gzipped and facts.offset >= size:
        raise DataError(
            f"{name}: the header's vox_offset ({facts.offset:,}) is past the end of the file "
            f"({size:,} bytes), so it holds no voxels: the header is damaged or {REEXPORT}"
        )
    if not facts.gzipped and size < expected:
        raise DataError(
            f"{name}: truncated: the header's image needs {expected:,} bytes, the file "
            f"holds {size:,}; {REEXPORT}"
        )
    if facts.gzipped and size * DEFLATE_MAX_RATIO < expected:
        raise DataError(
            f"{name}: the header's image needs {expected:,} bytes, more than {size:,} bytes "
            f"of gzip can inflate to (at most {DEFLATE_MAX_RATIO}x); the header is wrong or "
            f"{REEXPORT}"
        )
    # Deflate adds well under 1% to incompressible data.
    if facts.gzipped and size > expected + expected // 8 + INFLATE_MARGIN:
        raise DataError(
            f"{name}: {size:,} bytes of gzip, far more than its header's image of "
            f"{expected:,} bytes needs; the header is wrong or the file holds something "
            "else: re-export it"
        )


def _check_scaling(name: str, header: Any, dtype: np.dtype[Any]) -> None:
    try:
        slope, inter = header.get_slope_inter()
    except Exception as error:  # nibabel refuses a finite slope with an invalid intercept
        raise DataError(
            f"{name}: invalid scaling (scl_slope/scl_inter: {_reason(error)}); fix the header"
        ) from None
    if slope is None or dtype.kind not in "iu":
        return  # floats can overflow too, but only their voxels show it: the loader scans them
    info = np.iinfo(dtype)
    inter = inter or 0.0
    peak = max(abs(float(slope) * float(info.min) + inter), abs(float(slope) * info.max + inter))
    if not peak <= _FLOAT32_MAX:
        raise DataError(
            f"{name}: scl_slope {slope:g} and scl_inter {inter:g} scale {dtype.name} voxels "
            f"to up to {peak:.3g}, beyond float32's {_FLOAT32_MAX:.3g}: they would load as "
            "infinite; fix the header's scaling"
        )


def _reason(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]
