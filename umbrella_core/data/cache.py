"""The preprocessed-image cache: decode and preprocess each image once, then memory-map it.

An entry is the model-ready float32 array a modality's loader returns, stored
as ``.npy`` under ``ROOT/<modality>/<key>.npy``. The key hashes everything the
array depends on: the absolute path, size and modification time of each file
and of the files the loader finds next to it (``ModalitySpec.companions``); the
modality's name, shape, patch size and channels; settings bound to its loader
(``functools.partial`` keywords); and the version of the distribution that
provides the modality (its preprocessing code: plugins bump it when
preprocessing changes). Changing a
file, the geometry or the plugin therefore misses the cache instead of serving
stale data. Entries are written to a temporary name and renamed into place, so
concurrent processes (DataLoader workers, ranks) never read half a file, and a
run killed mid-write leaves nothing behind but a stray temporary file
(``.tmp-<pid>@<host>-*.npy``), which :meth:`PreprocessedCache.remove_stale`
deletes once its writer is dead or it is an hour old.

The cache does not trust its contents. After the array, each entry carries a
small trailer (format 2): a JSON object with the CRC-32 of the array's bytes
(one per window for a series cut into windows), its shape and dtype, the
modality and the source files, then its length and a magic string.
``np.load`` ignores the trailer, so an entry is still a plain ``.npy``. The
first time a process reads an entry (a window: that window) it checks it:
trailer, shape, dtype, checksum, no NaN or infinite value; an image entry is
read into memory in one pass for this, so the check costs no second copy. An
entry that fails is a miss: reported once (naming the entry and its source
files), removed and rebuilt from the source. Later reads in that process take
the bare memory-map path. CRC-32 rather than a cryptographic hash: the threat
is a zeroed, truncated or overwritten file, not an adversary, and ISA-L's
CRC-32 (``isal``, already a dependency for gzip) checks a 128³ volume in
~1 ms where BLAKE2b takes ~15 ms (benchmarks/README.md). NaN or infinite
values are refused when an entry is written, naming the source files.

``dtype="float16"`` (``data.cache_dtype``, since 0.3) stores entries in half
precision, as SwiFT stores fMRI frames: half the disk and the bytes read, each
value to float16's 11 significant bits (a relative error below 2⁻¹¹). Reads
still return float32, so the model sees the dtype it always did, and a miss
returns the stored values too, so an epoch gives the same tensors whether the
cache was built before it or during it. The dtype is part of the key (float32
keys are those of earlier versions): a float16 and a float32 run never share
an entry, and both may live in one folder. An image whose values do not fit
float16 (beyond ±65504, which would become infinite) keeps a float32 entry,
with one warning naming its files.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from umbrella_core.constants import IMAGING_VERSION
from umbrella_core.data.cache_format import (
    DTYPES,
    FORMAT,
    _Corrupt,
    _read_in_memory,
    _read_trailer,
    _trailer,
    checksum,
    converted,
)
from umbrella_core.errors import ConfigError, DataError
from umbrella_core.processes import process_alive
from umbrella_core.types import ModalitySpec

__all__ = ["PreprocessedCache", "default_cache_root", "CacheStats", "bound_settings"]

#: A temporary file older than this is a dead writer's, whatever its pid says.
STALE_AFTER_S = 3600.0
_TMP = ".tmp-"


def bound_settings(function: Any) -> list[list[str]]:
    """Settings bound to a loader (``functools.partial`` keywords), as sorted pairs."""
    keywords = getattr(function, "keywords", None) or {}
    return sorted([str(k), repr(v)] for k, v in keywords.items())


def _identity(path: str) -> list[Any]:
    absolute = os.path.abspath(path)
    try:
        stat = os.stat(absolute)
    except OSError:
        raise DataError(f"{path}: file not found") from None
    return [absolute, stat.st_size, stat.st_mtime_ns]


def default_cache_root() -> Path:
    """``$UMBRELLA_CACHE/preprocessed`` (``~/.cache/umbrella/preprocessed`` by default)."""
    from umbrella_core.data.demo import demo_cache_dir

    return demo_cache_dir() / "preprocessed"


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _all_finite(array: np.ndarray) -> bool:
    flat = array.reshape(-1)
    if flat.dtype == np.float16:
        # Exponent bits all set is infinity or NaN; np.isfinite on float16 is 20x slower.
        return not bool(np.any((flat.view(np.uint16) & 0x7C00) == 0x7C00))
    # One BLAS pass: a NaN or infinity anywhere makes the sum of squares
    # non-finite. Huge finite values may overflow it, so confirm exactly then.
    return bool(np.isfinite(np.dot(flat, flat))) or bool(np.isfinite(flat).all())


def _verdict(array: np.ndarray, meta: dict[str, Any], window: int | None = None) -> str | None:
    """What is wrong with an array against its trailer (None when nothing).

    An entry of windows records one checksum per window: ``window`` checks
    that one only (None: all of them).
    """
    if meta.get("shape") != list(array.shape) or meta.get("dtype") != array.dtype.str:
        return "the array header does not match its checksum trailer"
    crc = meta.get("crc32")
    if isinstance(crc, list):
        if len(crc) != array.shape[0]:
            return "damaged checksum trailer"
        if window is not None and not 0 <= window < len(crc):
            return None  # no such window: the caller says so
        for i in range(len(crc)) if window is None else (window,):
            if checksum(array[i]) != crc[i]:
                return f"checksum mismatch in window {i} (the content changed after it was written)"
            if not _all_finite(array[i]):
                return f"NaN or infinite values in window {i}"
        return None
    if checksum(array) != crc:
        return "checksum mismatch (the content changed after it was written)"
    if not _all_finite(array):
        return "NaN or infinite values"
    return None


@attrs.define
class CacheStats:
    hits: int = 0
    misses: int = 0
    #: Entries that failed their check, were reported and rebuilt (also counted as misses).
    rebuilt: int = 0


class PreprocessedCache:
    """Load images through their modality's loader, keeping the results on disk.

    Args:
        root: Folder of the cache.
        versions: Modality name → version string of the plugin that provides it.
        log: Receives one ``warning: ...`` line per corrupt entry found on
            read, and per image kept in float32 by a float16 cache (default:
            standard error). It travels to worker processes, so give a
            picklable one.
        dtype: ``float32`` or ``float16``: how entries are stored (reads
            always return float32). Since 0.3.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        versions: Mapping[str, str],
        *,
        log: Callable[[str], None] | None = None,
        dtype: str = "float32",
    ) -> None:
        if dtype not in DTYPES:
            raise ConfigError(f"cache dtype: expected float32 or float16, got {dtype!r}")
        self.root = Path(root).expanduser()
        self.versions = dict(versions)
        self.log = log
        self.dtype = DTYPES[dtype]
        # A float16 cache keeps float32 entries for images beyond float16's range.
        self._readable = tuple(dict.fromkeys([self.dtype, DTYPES["float32"]]))
        self.stats = CacheStats()
        # Entries (and windows: (entry, index)) this process has checked:
        # later reads skip the checksum.
        self._verified: set[Path | tuple[Path, int]] = set()

    def __getstate__(self) -> dict[str, Any]:
        # Another process checks entries on its own first read.
        state = self.__dict__.copy()
        state["_verified"] = set()
        return state

    def key(self, spec: ModalitySpec, paths: Sequence[str], *, series: bool = False) -> str:
        """The entry name: a hash of the files' identity, the geometry and the plugin."""
        files = [_identity(path) for path in paths]
        found = spec.companions(spec, tuple(paths)) if spec.companions is not None else []
        companions = [_identity(path) for path in found]
        identity = {
            "format": FORMAT,
            "modality": spec.name,
            # A series does not depend on the window length or the patches.
            "shape": list(spec.shape[:-1] if series else spec.shape),
            "patch_size": [] if series else list(spec.patch_size),
            "series": series,
            # Settings bound to the loader (functools.partial keywords, such as a
            # target spacing or repetition time) change the output too.
            "settings": bound_settings(
                spec.windows.series if series and spec.windows is not None else spec.load
            ),
            "channels": spec.channels,
            "plugin": self.versions.get(spec.name, ""),
            "files": files,
            "companions": companions,
        }
        if self.dtype != DTYPES["float32"]:
            identity["dtype"] = self.dtype.name  # float32 keys stay those of earlier versions
        if IMAGING_VERSION != 1:  # likewise: version 1's keys are those of earlier versions
            identity["imaging"] = IMAGING_VERSION
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]

    def entry(self, spec: ModalitySpec, paths: Sequence[str]) -> Path:
        """Where the array of a (non-windowed) image is stored."""
        return self.root / spec.name / f"{self.key(spec, paths)}.npy"

    def window_entry(self, spec: ModalitySpec, paths: Sequence[str]) -> Path:
        """Where the windows of a windowed modality's series are stored."""
        key = self.key(spec, paths, series=True)
        assert spec.windows is not None  # only windowed modalities have window entries
        return self.root / spec.name / f"{key}-w{spec.shape[-1]}s{spec.windows.stride}.npy"

    def load(self, spec: ModalitySpec, paths: Sequence[str]) -> np.ndarray:
        """The preprocessed array, from the cache or computed and stored."""
        entry = self.entry(spec, paths)
        array = self._read(entry, paths, spec.input_shape)
        if array is not None:
            self.stats.hits += 1
        else:
            self.stats.misses += 1
            array = np.ascontiguousarray(spec.load(spec, tuple(paths)), dtype=np.float32)
            array = self._store(entry, array, spec, paths)
        return converted(array, DTYPES["float32"])

    def window(self, spec: ModalitySpec, paths: Sequence[str], index: int) -> np.ndarray:
        """Window ``index`` of a windowed modality's series, ``(channels, *spec.shape)``.

        The series is preprocessed once and stored cut into its windows,
        ``(windows, channels, *spec.shape)``: a window is one contiguous block
        already in model layout, so reading it touches only its own pages and
        needs no transpose. Overlapping windows (stride below the window
        length) are stored once per window, trading disk for read speed.
        """
        entry = self.window_entry(spec, paths)
        stored = self._read(entry, paths, spec.input_shape, window=index)
        if stored is not None:
            self.stats.hits += 1
        else:
            self.stats.misses += 1
            assert spec.windows is not None  # window_entry has checked it
            series = np.asarray(spec.windows.series(spec, tuple(paths)), dtype=np.float32)
            length, count = spec.shape[-1], spec.window_count(series.shape[-1])
            if count == 0:
                raise DataError(
                    f"{', '.join(paths)}: {series.shape[-1]} frames, fewer than the {length} "
                    f"of one {spec.name} window"
                )
            stored = np.stack([series[..., spec.window_slice(i)] for i in range(count)])
            stored = self._store(entry, stored, spec, paths, windows=True)
        if not 0 <= index < stored.shape[0]:
            raise DataError(
                f"{', '.join(paths)}: window {index} does not exist; the series gives "
                f"{stored.shape[0]} windows"
            )
        block = stored[index]
        return np.array(block) if block.dtype == np.float32 else converted(block, np.float32)

    def check(
        self,
        entry: str | os.PathLike[str],
        shape: tuple[int, ...] | None = None,
        *,
        windows: bool = False,
    ) -> str | None:
        """What is wrong with one entry (None when nothing): read and checked in full.

        Args:
            entry: The entry's path.
            shape: The array shape the run expects (of one window when
                ``windows``); None accepts the shape the trailer records, and
                either dtype (a folder shared by float32 and float16 runs).
            windows: The entry holds a series cut into windows.
        """
        entry = Path(entry)
        try:
            array = np.load(entry, mmap_mode="r")
        except FileNotFoundError:
            return "missing"
        except (ValueError, OSError) as exc:
            return f"unreadable ({exc})"
        dtypes = tuple(DTYPES.values()) if shape is None else self._readable
        return self._problem(entry, array, shape, windows, dtypes=dtypes)

    def _problem(
        self,
        entry: Path,
        array: np.ndarray,
        shape: tuple[int, ...] | None,
        windows: bool,
        window: int | None = None,
        *,
        dtypes: tuple[np.dtype, ...],
    ) -> str | None:
        if not isinstance(array, np.memmap):
            return "not a .npy array"
        if array.dtype not in dtypes:
            return f"dtype {array.dtype}, expected {' or '.join(d.name for d in dtypes)}"
        found = tuple(array.shape[1:] if windows else array.shape)
        if shape is not None and found != tuple(shape):
            return f"shape {found}, expected {tuple(shape)}"
        try:
            return _verdict(array, _read_trailer(entry, array), window)
        except _Corrupt as exc:
            return str(exc)

    def _read(
        self,
        entry: Path,
        paths: Sequence[str],
        shape: tuple[int, ...],
        *,
        window: int | None = None,
    ) -> np.ndarray | None:
        """The entry's array when it is sound; None (a miss) when absent or corrupt.

        ``window``: the entry holds a series cut into windows, and this one
        is about to be read (only its checksum is checked).
        """
        windows = window is not None
        verified = entry if window is None else (entry, window)
        if verified in self._verified:
            try:
                array = np.load(entry, mmap_mode="r")
            except FileNotFoundError:
                self._verified.discard(verified)
                return None
            except (ValueError, OSError):
                pass  # checked in full below
            else:
                found = array.shape[1:] if windows else array.shape
                if found == shape and array.dtype in self._readable:
                    return array
        try:
            if windows:  # a whole series: map it rather than hold it
                array = np.load(entry, mmap_mode="r")
                problem = self._problem(entry, array, shape, windows, window, dtypes=self._readable)
            else:
                array, meta = _read_in_memory(entry, shape, self._readable)
                problem = _verdict(array, meta)
        except FileNotFoundError:
            return None
        except _Corrupt as exc:
            problem = str(exc)
        except (ValueError, OSError) as exc:
            problem = f"unreadable ({exc})"
        if problem is None:
            self._verified.add(verified)
            return array
        self._verified = {
            v for v in self._verified if (v[0] if isinstance(v, tuple) else v) != entry
        }
        self.stats.rebuilt += 1
        (self.log or _stderr)(
            f"warning: cache entry {entry} is corrupt: {problem}; "
            f"rebuilding it from {', '.join(paths)}"
        )
        entry.unlink(missing_ok=True)
        return None

    def _store(
        self,
        entry: Path,
        array: np.ndarray,
        spec: ModalitySpec,
        paths: Sequence[str],
        *,
        windows: bool = False,
    ) -> np.ndarray:
        """Write ``array`` (in the cache's dtype where it fits); returns what was written."""
        if not _all_finite(array):
            raise DataError(
                f"{', '.join(paths)}: the {spec.name} preprocessing gave NaN or infinite "
                "values; not cached"
            )
        if self.dtype != array.dtype:
            narrow = converted(array, self.dtype)
            if _all_finite(narrow):
                array = narrow
            else:
                (self.log or _stderr)(
                    f"warning: {', '.join(paths)}: the {spec.name} preprocessing gives values "
                    f"up to {float(np.abs(array).max()):.6g}, beyond {self.dtype.name}'s "
                    f"±{float(np.finfo(self.dtype).max):.6g}; its cache entry is kept in float32"
                )
        entry.parent.mkdir(parents=True, exist_ok=True)
        prefix = f"{_TMP}{os.getpid()}@{socket.gethostname()}-"
        handle, tmp = tempfile.mkstemp(dir=entry.parent, prefix=prefix, suffix=".npy")
        try:
            with os.fdopen(handle, "wb") as out:
                np.save(out, array, allow_pickle=False)
                out.write(_trailer(array, spec, paths, windows=windows))
            os.replace(tmp, entry)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._verified.update([(entry, i) for i in range(len(array))] if windows else [entry])
        return array

    def entries(self) -> Iterator[Path]:
        """Every entry in the cache folder (temporary files left out)."""
        if not self.root.is_dir():
            return
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir()):
            yield from sorted(p for p in folder.glob("*.npy") if not p.name.startswith(_TMP))

    def remove_stale(self, max_age_s: float = STALE_AFTER_S) -> list[Path]:
        """Delete temporary files of killed writers; returns those removed.

        A temporary file is stale when its writer (the pid in its name, on
        this host) is gone, or when it is older than ``max_age_s`` whoever
        wrote it: a writer on another host of a shared folder cannot be asked.
        """
        removed: list[Path] = []
        if not self.root.is_dir():
            return removed
        host, now = socket.gethostname(), time.time()
        for folder in (p for p in self.root.iterdir() if p.is_dir()):
            for tmp in folder.glob(f"{_TMP}*"):
                writer = tmp.name[len(_TMP) :].rsplit("-", 1)[0]
                pid, _, where = writer.partition("@")
                try:
                    old = now - tmp.stat().st_mtime > max_age_s
                except FileNotFoundError:
                    continue  # its writer just renamed it into place
                dead = where == host and pid.isdigit() and not process_alive(int(pid))
                if old or dead:
                    tmp.unlink(missing_ok=True)
                    removed.append(tmp)
        return removed

    def info(self) -> dict[str, Any]:
        """Entries and bytes per modality (temporary files not counted)."""
        out: dict[str, Any] = {}
        for entry in self.entries():
            try:
                size = entry.stat().st_size
            except FileNotFoundError:
                continue  # removed as corrupt by another process meanwhile
            row = out.setdefault(entry.parent.name, {"entries": 0, "bytes": 0})
            row["entries"] += 1
            row["bytes"] += size
        return out
