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
run killed mid-write leaves nothing behind but a stray temporary file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from umbrella_core.errors import DataError
from umbrella_core.types import ModalitySpec

__all__ = ["PreprocessedCache", "default_cache_root", "CacheStats"]

FORMAT = 1


def _bound_settings(function: Any) -> list[list[str]]:
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


@attrs.define
class CacheStats:
    hits: int = 0
    misses: int = 0


class PreprocessedCache:
    """Load images through their modality's loader, keeping the results on disk.

    Args:
        root: Folder of the cache.
        versions: Modality name → version string of the plugin that provides it.
    """

    def __init__(self, root: str | os.PathLike[str], versions: Mapping[str, str]) -> None:
        self.root = Path(root).expanduser()
        self.versions = dict(versions)
        self.stats = CacheStats()

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
            "settings": _bound_settings(
                spec.windows.series if series and spec.windows is not None else spec.load
            ),
            "channels": spec.channels,
            "plugin": self.versions.get(spec.name, ""),
            "files": files,
            "companions": companions,
        }
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]

    def entry(self, spec: ModalitySpec, paths: Sequence[str]) -> Path:
        return self.root / spec.name / f"{self.key(spec, paths)}.npy"

    def load(self, spec: ModalitySpec, paths: Sequence[str]) -> np.ndarray:
        """The preprocessed array, from the cache or computed and stored."""
        entry = self.entry(spec, paths)
        try:
            array = np.load(entry, mmap_mode="r")
        except (FileNotFoundError, ValueError, OSError):
            array = None
        if array is not None and array.shape == spec.input_shape and array.dtype == np.float32:
            self.stats.hits += 1
            return array
        self.stats.misses += 1
        array = np.ascontiguousarray(spec.load(spec, tuple(paths)), dtype=np.float32)
        self._store(entry, array)
        return array

    def window(self, spec: ModalitySpec, paths: Sequence[str], index: int) -> np.ndarray:
        """Window ``index`` of a windowed modality's series, ``(channels, *spec.shape)``.

        The series is preprocessed once and stored cut into its windows,
        ``(windows, channels, *spec.shape)``: a window is one contiguous block
        already in model layout, so reading it touches only its own pages and
        needs no transpose. Overlapping windows (stride below the window
        length) are stored once per window, trading disk for read speed.
        """
        key = self.key(spec, paths, series=True)
        entry = self.root / spec.name / f"{key}-w{spec.shape[-1]}s{spec.windows.stride}.npy"
        try:
            stored = np.load(entry, mmap_mode="r")
        except (FileNotFoundError, ValueError, OSError):
            stored = None
        if stored is not None and tuple(stored.shape[1:]) == spec.input_shape:
            self.stats.hits += 1
        else:
            self.stats.misses += 1
            series = np.asarray(spec.windows.series(spec, tuple(paths)), dtype=np.float32)
            length, count = spec.shape[-1], spec.window_count(series.shape[-1])
            if count == 0:
                raise DataError(
                    f"{', '.join(paths)}: {series.shape[-1]} frames, fewer than the {length} "
                    f"of one {spec.name} window"
                )
            stored = np.stack([series[..., spec.window_slice(i)] for i in range(count)])
            self._store(entry, stored)
        if not 0 <= index < stored.shape[0]:
            raise DataError(
                f"{', '.join(paths)}: window {index} does not exist; the series gives "
                f"{stored.shape[0]} windows"
            )
        return np.array(stored[index])

    def _store(self, entry: Path, array: np.ndarray) -> None:
        entry.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(dir=entry.parent, prefix=".tmp-", suffix=".npy")
        try:
            with os.fdopen(handle, "wb") as out:
                np.save(out, array, allow_pickle=False)
            os.replace(tmp, entry)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def info(self) -> dict[str, Any]:
        """Entries and bytes per modality."""
        out: dict[str, Any] = {}
        if not self.root.is_dir():
            return out
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir()):
            files = list(folder.glob("*.npy"))
            out[folder.name] = {
                "entries": len(files),
                "bytes": sum(f.stat().st_size for f in files),
            }
        return out


def _fill(cache: PreprocessedCache, spec: ModalitySpec, paths: tuple[str, ...]) -> str | None:
    try:
        if spec.windowed:
            cache.window(spec, paths, 0)
        else:
            cache.load(spec, paths)
    except DataError as exc:
        return str(exc)
    return None


def build_cache(
    cache: PreprocessedCache,
    images: Sequence[tuple[ModalitySpec, tuple[str, ...]]],
    *,
    workers: int = 1,
) -> tuple[int, list[str]]:
    """Preprocess every image into ``cache``; returns (images done, problems).

    Images already cached are skipped cheaply (one stat per file and a header
    read). With ``workers > 1`` images are preprocessed in that many processes.
    """
    unique = list(dict.fromkeys((spec, tuple(paths)) for spec, paths in images))
    problems: list[str] = []
    if workers <= 1:
        results = [_fill(cache, spec, paths) for spec, paths in unique]
    else:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = list(
                pool.map(_fill, [cache] * len(unique), *zip(*unique, strict=True), chunksize=4)
            )
    problems = [r for r in results if r is not None]
    return len(unique) - len(problems), problems
