"""Reading some frames of a 4D NIfTI series without decoding the others (new in 0.3).

Part of :mod:`umbrella_core.imaging`, which re-exports every public name.
:func:`read_frames` returns frames ``start ... stop - 1`` of a series as
:func:`~umbrella_core.imaging.load_nifti` would return them (float32, scaled,
reoriented to RAS), after the same header checks. NIfTI stores a series frame
after frame, so the frames asked for are one run of bytes:

* a plain ``.nii`` is read at that run's offset, nothing else;
* a ``.nii.gz`` asked for all its frames is inflated in one call with ISA-L
  (:func:`~umbrella_core.imaging.header.inflate`, bounded), as ``load_nifti`` does;
* a ``.nii.gz`` asked for some of its frames is read through a gzip index
  (``indexed_gzip``, the random-access reader nibabel itself uses): seek points
  every ~1 MiB of inflated data, each with the 32 KiB of history deflate needs to
  resume there, so a read inflates at most one spacing more than the frames.

Building an index inflates the file once, up to the end of the image (zlib's
speed, about twice ISA-L's time), so indexes are saved: one small file per
series in ``index_dir`` (by default :func:`default_series_root`/``gzip``),
named by the series' path and its fingerprint (:func:`file_fingerprint`: size,
modification time and gzip trailer). A changed file has another fingerprint,
so its old index is never used; it is deleted when the new one is written. An
index that does not import (damaged, another ``indexed_gzip`` format) is
rebuilt; a folder that cannot be written costs every partial read a full
inflate, and says so once.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import sys
import tempfile
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from umbrella_core.errors import DataError
from umbrella_core.imaging.files import missing_file_message, open_regular
from umbrella_core.imaging.header import REEXPORT, NiftiHeader, inflate, read_nifti_header
from umbrella_core.imaging.nifti import RAS, reorient

if TYPE_CHECKING:  # pragma: no cover
    from numpy.typing import NDArray

__all__ = ["read_frames", "file_fingerprint", "default_series_root", "INDEX_SPACING"]

#: Least inflated bytes between two seek points of a gzip index. Each point
#: keeps 32 KiB, so an index is ~3 % of the inflated series; a read inflates on
#: average half a spacing it does not return.
INDEX_SPACING = 1 << 20

#: Most seek points an index gets (longer series get a wider spacing): 16 MiB
#: of index at most, for an HCP-sized run of 1.6 GB inflated.
INDEX_POINTS = 512

_SUFFIX = ".gzidx"
# What reading a damaged file raises (indexed_gzip's ZranError and CrcError are OSErrors).
_READ_ERRORS = (OSError, EOFError, ValueError, zlib.error)
_warned: set[str] = set()


def default_series_root() -> Path:
    """``$UMBRELLA_CACHE/series`` (``~/.cache/umbrella/series`` by default).

    What partial reads of series keep between processes: ``gzip/`` holds the
    gzip indexes of :func:`read_frames`; a plugin may keep per-series facts in
    a folder of its own name (the fMRI plugin's statistics in ``fmri/``).
    """
    # The folder of data.demo.demo_cache_dir, which imports this package (so not imported here).
    base = os.environ.get("UMBRELLA_CACHE")
    if not base:
        xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        base = str(Path(xdg) / "umbrella")
    return Path(base) / "series"


def file_fingerprint(path: str | os.PathLike[str]) -> str:
    """What identifies the content of ``path`` without reading it: a hex digest.

    Of the absolute path, the size, the modification time in nanoseconds and,
    for a gzip file, its last 8 bytes (the CRC-32 and length of the inflated
    data of its last member), which change with the content even when a copy
    keeps the size and time.

    Raises:
        DataError: The file cannot be opened (naming it and why).
    """
    name = os.fspath(path)
    with open_regular(name) as handle:
        stat = os.fstat(handle.fileno())
        tail = b""
        if handle.read(2) == b"\x1f\x8b" and stat.st_size >= 18:
            handle.seek(-8, os.SEEK_END)
            tail = handle.read(8)
    text = f"{os.path.abspath(name)}\0{stat.st_size}\0{stat.st_mtime_ns}\0{tail.hex()}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def read_frames(
    path: str | os.PathLike[str],
    start: int,
    stop: int,
    *,
    index_dir: str | os.PathLike[str] | None = None,
) -> tuple[NDArray[np.float32], NDArray[np.float64]]:
    """Frames ``start ... stop - 1`` of a 4D series, as float32 in RAS orientation.

    The values are those of ``load_nifti(path)[0][..., start:stop]`` (scaling
    applied in float32, the first three axes permuted and flipped to RAS; for a
    plain ``.nii`` with scaling, ``load_nifti`` leaves it to nibabel, whose float64
    arithmetic may round the last bit otherwise), and they do not depend on
    ``start`` and ``stop``. Only the bytes of those frames are read (through a
    saved gzip index for a ``.nii.gz``, see the module's docstring).

    Args:
        path: A 4D ``.nii`` or ``.nii.gz`` series.
        start: First frame.
        stop: One past the last frame; ``start < stop <= frames``.
        index_dir: Where gzip indexes are kept (None: ``default_series_root() / "gzip"``).

    Returns:
        ``(data, affine)``: ``data`` of shape ``(x, y, z, stop - start)`` with
        positive strides, x fastest as NIfTI stores it; the 4x4 affine of its grid.

    Raises:
        DataError: What :func:`~umbrella_core.imaging.read_nifti_header` refuses,
            a 3D image, a file that cannot be read or decoded up to the last frame
            asked for (truncated, corrupt), NaN or infinite voxels in those
            frames. The message names the file.
        ValueError: ``start``/``stop`` outside the series.
    """
    name = os.fspath(path)
    facts = read_nifti_header(name)
    if len(facts.shape) != 4:
        raise DataError(f"{name}: expected a 4D series (x, y, z, time), got shape {facts.shape}")
    frames = facts.shape[3]
    if not 0 <= start < stop <= frames:
        raise ValueError(f"{name}: frames {start}:{stop} are not within its {frames} frames")
    frame_bytes = math.prod(facts.shape[:3]) * facts.dtype.itemsize
    begin = facts.offset + start * frame_bytes
    buffer = np.empty((stop - start) * frame_bytes, dtype=np.uint8)
    try:
        if not facts.gzipped:
            _read_plain(name, begin, buffer)
        elif start == 0 and stop == frames:
            # Every frame: ISA-L's one-call inflate is twice zlib's speed, and needs no index.
            with open_regular(name) as handle:
                raw = handle.read()
            buffer = np.frombuffer(
                inflate(name, raw, facts.expected), np.uint8, buffer.size, facts.offset
            )
            del raw
        else:
            _read_indexed(name, facts, begin, buffer, index_dir)
    except PermissionError:
        raise DataError(missing_file_message(name)) from None
    except _READ_ERRORS as error:
        raise DataError(
            f"{name}: cannot decode the image data ({_reason(error)}); {REEXPORT}"
        ) from None
    return _frames(name, facts, buffer, stop - start)


def _read_plain(name: str, begin: int, buffer: NDArray[np.uint8]) -> None:
    with open_regular(name) as handle:
        handle.seek(begin)
        filled = _fill(handle, buffer)
    if filled < buffer.size:
        raise DataError(f"{name}: truncated: the file ends within its frames; {REEXPORT}")


def _fill(handle: Any, buffer: NDArray[np.uint8]) -> int:
    # mypy: numpy's stubs give ndarray __buffer__ on Python >= 3.12 only.
    view = memoryview(buffer)  # type: ignore[arg-type]
    filled = 0
    while filled < buffer.size:
        count = handle.readinto(view[filled:])
        if not count:
            break
        filled += count
    return filled


def _read_indexed(
    name: str,
    facts: NiftiHeader,
    begin: int,
    buffer: NDArray[np.uint8],
    index_dir: str | os.PathLike[str] | None,
) -> None:
    try:
        import indexed_gzip
    except ImportError:  # pragma: no cover - a dependency; without it, inflate it all
        with open_regular(name) as handle:
            raw = handle.read()
        buffer[:] = np.frombuffer(inflate(name, raw, facts.expected), np.uint8, buffer.size, begin)
        return
    folder = Path(index_dir) if index_dir is not None else default_series_root() / "gzip"
    owner = hashlib.sha256(os.path.abspath(name).encode()).hexdigest()[:16]
    index = folder / f"{owner}-{file_fingerprint(name)[:16]}{_SUFFIX}"
    spacing = max(INDEX_SPACING, -(-facts.expected // INDEX_POINTS))
    with open_regular(name) as handle:
        # A small buffer: reads of frames are large and go straight into ``buffer``.
        options = {"fileobj": handle, "spacing": spacing, "buffer_size": 1 << 16}
        reader = None
        if index.is_file():
            try:
                reader = indexed_gzip.IndexedGzipFile(index_file=str(index), **options)
            except _READ_ERRORS:  # damaged, or another format: rebuilt below
                with contextlib.suppress(OSError):
                    index.unlink()
                handle.seek(0)
        if reader is None:
            reader = indexed_gzip.IndexedGzipFile(**options)
            # Seek points up to the end of the image, not of the stream (what
            # build_full_index does): a gzip bomb inflates no further than the header's image.
            reader.seek(facts.expected - 1)
            _save_index(reader, index, owner)
        try:
            reader.seek(begin)
            filled = _fill(reader, buffer)
        finally:
            reader.close()
    if filled < buffer.size:
        raise DataError(
            f"{name}: cannot decode the image data (the gzip data end before the frames "
            f"asked for); {REEXPORT}"
        )


def _save_index(reader: Any, index: Path, owner: str) -> None:
    """Save ``reader``'s index as ``index`` (renamed into place); drop its file's older ones."""
    try:
        index.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(dir=index.parent, prefix=".tmp-", suffix=_SUFFIX)
        try:
            with os.fdopen(handle, "wb") as out:
                reader.export_index(fileobj=out)
            os.replace(tmp, index)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        for old in index.parent.glob(f"{owner}-*{_SUFFIX}"):
            if old != index:
                old.unlink(missing_ok=True)  # the file changed: that index is of its past
    except OSError as error:
        _warn_once(
            str(index.parent),
            f"warning: {index.parent}: cannot save gzip indexes ({error}); every partial "
            "read of a .nii.gz inflates it from its start (set UMBRELLA_CACHE to a writable "
            "folder)",
        )


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        print(message, file=sys.stderr, flush=True)


def _frames(
    name: str, facts: NiftiHeader, buffer: NDArray[np.uint8], count: int
) -> tuple[NDArray[np.float32], NDArray[np.float64]]:
    """The frames' bytes as ``load_nifti`` makes voxels of them: scaled in float32, RAS."""
    shape = (*facts.shape[:3], count)
    raw = buffer.view(facts.dtype).reshape(shape, order="F")
    slope, inter = facts.header.get_slope_inter()
    data = raw.astype(np.float32)
    if slope is not None and float(slope) != 1.0:
        data *= np.float32(slope)
    if inter is not None and float(inter) != 0.0:
        data += np.float32(inter)
    # Integers cannot be NaN, and read_nifti_header refuses scaling that overflows.
    if facts.dtype.kind == "f":
        finite = np.isfinite(data)
        if not finite.all():
            bad = int(data.size - np.count_nonzero(finite))
            raise DataError(
                f"{name}: {bad} of {data.size} voxels are NaN or infinite; replace them "
                "(e.g. fslmaths IN -nan OUT) or re-export the file"
            )
    affine = np.asarray(facts.header.get_best_affine(), dtype=np.float64)
    # mypy: reorient returns the array's own dtype, which its annotation does not carry.
    data, affine = reorient(data, affine, RAS)  # type: ignore[assignment]
    if any(step < 0 for step in data.strides):
        data = np.array(data, order="K")
    return data, affine


def _reason(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]
