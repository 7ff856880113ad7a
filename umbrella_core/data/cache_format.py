"""What a cache entry holds on disk: the ``.npy`` array, then its checksum trailer.

Part of :mod:`umbrella_core.data.cache` (which re-exports :func:`checksum`;
see its docstring for what the trailer is for). The trailer (format 2) is a
JSON object (the CRC-32 of the array's bytes, one per window for a series cut
into windows; shape, dtype, modality, source files), then its length and a
magic string, so ``np.load`` still reads an entry as a plain ``.npy``.

An entry's array is float32, or float16 in a cache of ``dtype="float16"``
(``data.cache_dtype``, since 0.3); the checksum covers the stored bytes.
"""

from __future__ import annotations

import json
import os
import struct
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from umbrella_core.types import ModalitySpec

try:  # ISA-L's CRC-32: the same values as zlib's, ~4x faster.
    from isal.isal_zlib import crc32 as _crc32
except ImportError:  # pragma: no cover - isal is a dependency; zlib gives the same checksum
    from zlib import crc32 as _crc32

__all__ = ["FORMAT", "DTYPES", "checksum", "converted"]

#: Part of every key: bump it whenever what an entry holds changes.
#: 2: a checksum trailer after the array.
FORMAT = 2
_MAGIC = b"UMBRELLA-CACHE02"
_TAIL = struct.Struct("<Q16s")  # trailer length, magic
_MAX_TRAILER = 1 << 20


#: What an entry's array may be stored as (``data.cache_dtype``).
DTYPES: dict[str, np.dtype[Any]] = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
}


def converted(array: np.ndarray, dtype: np.dtype | type) -> np.ndarray:
    """``array`` as ``dtype``: itself when it already is, else a new C-contiguous array.

    numpy's float16 conversion has no SIMD path (~4 ms for a 128³ volume);
    torch's uses F16C (~0.3 ms). torch is used only when the process has
    already imported it (a DataLoader worker, training), so building or
    verifying the cache does not pay its import; both give identical values.
    """
    dtype = np.dtype(dtype)
    if array.dtype == dtype:
        return array
    torch = sys.modules.get("torch")
    if torch is None:
        return np.asarray(array, dtype=dtype)
    with warnings.catch_warnings():
        # A read-only memory map: torch warns that writes would reach it; none do.
        warnings.simplefilter("ignore", UserWarning)
        source = torch.from_numpy(np.ascontiguousarray(array))
    return source.to(getattr(torch, dtype.name)).numpy()


def checksum(array: np.ndarray) -> int:
    """CRC-32 of a C-contiguous array's bytes (what an entry's trailer records)."""
    return _crc32(np.ascontiguousarray(array).data.cast("B"))


class _Corrupt(Exception):
    pass


def _parse_trailer(rest: bytes) -> dict[str, Any]:
    """The trailer's JSON object from the bytes after the array."""
    if len(rest) < _TAIL.size or rest[-_TAIL.size :][8:] != _MAGIC:
        raise _Corrupt("no checksum (overwritten, or written by an older cache format)")
    (length,) = struct.unpack("<Q", rest[-_TAIL.size :][:8])
    if length != len(rest) - _TAIL.size:
        raise _Corrupt("damaged checksum trailer")
    try:
        meta = json.loads(rest[:length])
    except ValueError:
        raise _Corrupt("damaged checksum trailer") from None
    if not isinstance(meta, dict):
        raise _Corrupt("damaged checksum trailer")
    return meta


def _read_trailer(entry: Path, array: np.memmap) -> dict[str, Any]:
    with open(entry, "rb") as handle:
        handle.seek(int(array.offset) + array.nbytes)
        return _parse_trailer(handle.read(_MAX_TRAILER + _TAIL.size + 1))


def _read_in_memory(
    entry: Path, shape: tuple[int, ...], dtypes: Sequence[np.dtype] = (DTYPES["float32"],)
) -> tuple[np.ndarray, dict[str, Any]]:
    """An entry's array, read into memory in one sequential pass, and its trailer.

    A check reads the whole entry anyway; reading it rather than mapping it
    lets the caller keep the array without copying it out of a memory map.
    """
    from numpy.lib import format as npy

    with open(entry, "rb") as handle:
        try:
            major, _ = npy.read_magic(handle)
            if major not in (1, 2):
                raise ValueError(f"unsupported .npy version {major}")
            read_header = npy.read_array_header_1_0 if major == 1 else npy.read_array_header_2_0
            found, fortran, dtype = read_header(handle)
        except ValueError as exc:
            raise _Corrupt(f"unreadable ({exc})") from None
        if dtype not in dtypes or fortran:
            order = " (Fortran order)" if fortran else ""
            expected = " or ".join(d.name for d in dtypes)
            raise _Corrupt(f"dtype {dtype}{order}, expected {expected} in C order")
        if tuple(found) != tuple(shape):
            raise _Corrupt(f"shape {tuple(found)}, expected {tuple(shape)}")
        array = np.empty(shape, dtype)  # the expected shape, never the header's claim
        if handle.readinto(array.data.cast("B")) != array.nbytes:
            raise _Corrupt("truncated")
        meta = _parse_trailer(handle.read(_MAX_TRAILER + _TAIL.size + 1))
    return array, meta


def _trailer(
    array: np.ndarray, spec: ModalitySpec, paths: Sequence[str], *, windows: bool = False
) -> bytes:
    meta = {
        "format": FORMAT,
        # One per window for a series cut into windows: a read checks its window only.
        "crc32": [checksum(block) for block in array] if windows else checksum(array),
        "shape": list(array.shape),
        "dtype": array.dtype.str,
        "modality": spec.name,
        "sources": [os.path.abspath(p) for p in paths],
    }
    body = json.dumps(meta, sort_keys=True).encode()
    return body + _TAIL.pack(len(body), _MAGIC)
