"""Building and verifying the preprocessed cache (``umbrella cache build`` and ``verify``).

:class:`~umbrella_core.data.cache.PreprocessedCache` reads and writes one
entry; these fill it for a whole run (in worker processes when asked) and
check every entry in full, rebuilding what is corrupt.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import attrs
import numpy as np

from umbrella_core.data.cache import PreprocessedCache
from umbrella_core.data.cache_format import _Corrupt, _read_trailer
from umbrella_core.errors import DataError
from umbrella_core.types import ModalitySpec

__all__ = ["CacheBuild", "CacheVerification", "build_cache", "verify_cache"]


@attrs.frozen
class CacheBuild:
    """What :func:`build_cache` did."""

    #: Images preprocessed or found in the cache, sound.
    done: int
    #: One line per image that could not be preprocessed, naming its files.
    problems: list[str]
    #: Corrupt entries found, reported and rebuilt.
    rebuilt: int = 0
    #: Temporary files of killed builds removed.
    stale: int = 0


def _fill(cache: PreprocessedCache, spec: ModalitySpec, paths: tuple[str, ...]) -> tuple[str, int]:
    before = cache.stats.rebuilt
    try:
        if spec.windowed:
            cache.window(spec, paths, 0)
        else:
            cache.load(spec, paths)
    except DataError as exc:
        return str(exc), cache.stats.rebuilt - before
    return "", cache.stats.rebuilt - before


def build_cache(
    cache: PreprocessedCache,
    images: Sequence[tuple[ModalitySpec, tuple[str, ...]]],
    *,
    workers: int = 1,
) -> CacheBuild:
    """Preprocess every image into ``cache``.

    Images already cached are read and checked (header, checksum, finite
    values); a corrupt entry is rebuilt. Stale temporary files of killed
    builds are removed first. With ``workers > 1`` images are preprocessed in
    that many processes.
    """
    stale = len(cache.remove_stale())
    unique = list(dict.fromkeys((spec, tuple(paths)) for spec, paths in images))
    if workers <= 1:
        results = [_fill(cache, spec, paths) for spec, paths in unique]
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # Not fork: a parent that has preprocessed (torch's OpenMP pool
        # started) forks children that deadlock in their first OpenMP region.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            results = list(
                pool.map(_fill, [cache] * len(unique), *zip(*unique, strict=True), chunksize=4)
            )
    problems = [problem for problem, _ in results if problem]
    rebuilt = sum(count for _, count in results)
    return CacheBuild(len(unique) - len(problems), problems, rebuilt, stale)


@attrs.frozen
class CacheVerification:
    """What :func:`verify_cache` found."""

    #: Entries read and checked.
    checked: int
    #: ``entry: problem (sources)`` per corrupt entry.
    corrupt: list[str]
    #: Images of the run with no entry yet (only when images were given).
    missing: int = 0
    #: Corrupt entries rebuilt from their source files (only when images were given).
    rebuilt: int = 0
    #: Corrupt entries removed (when not ``dry_run``).
    removed: int = 0
    #: Temporary files of killed builds removed.
    stale: int = 0


def _sources(entry: Path) -> list[str]:
    try:
        array = np.load(entry, mmap_mode="r")
        return [str(s) for s in _read_trailer(entry, array).get("sources", [])]
    except (_Corrupt, ValueError, OSError, AttributeError):
        return []


def verify_cache(
    cache: PreprocessedCache,
    images: Sequence[tuple[ModalitySpec, tuple[str, ...]]] | None = None,
    *,
    dry_run: bool = False,
    workers: int = 1,
) -> CacheVerification:
    """Check entries in full: every entry of the cache folder, or those of ``images``.

    Each entry is read and checked (trailer, shape, dtype, checksum, finite
    values). Unless ``dry_run``, a corrupt entry is removed, and when
    ``images`` are given it is rebuilt from its source files.
    """
    stale = 0 if dry_run else len(cache.remove_stale())
    found: list[tuple[Path, str, list[str], tuple[ModalitySpec, tuple[str, ...]] | None]] = []
    checked = missing = 0
    if images is None:
        for entry in cache.entries():
            checked += 1
            problem = cache.check(entry)
            if problem is not None:
                found.append((entry, problem, _sources(entry), None))
    else:
        for spec, paths in dict.fromkeys((spec, tuple(paths)) for spec, paths in images):
            try:
                where = cache.window_entry if spec.windowed else cache.entry
                entry = where(spec, paths)
            except DataError:
                continue  # a source file is gone: nothing of it can be in the cache
            problem = cache.check(entry, spec.input_shape, windows=spec.windowed)
            if problem == "missing":
                missing += 1
                continue
            checked += 1
            if problem is not None:
                found.append((entry, problem, list(paths), (spec, paths)))
    corrupt = [
        f"{entry}: {problem}" + (f" (from {', '.join(sources)})" if sources else "")
        for entry, problem, sources, _ in found
    ]
    removed = rebuilt = 0
    if not dry_run:
        for entry, *_ in found:
            entry.unlink(missing_ok=True)
            removed += 1
        todo = [image for *_, image in found if image is not None]
        if todo:
            rebuilt = build_cache(cache, todo, workers=workers).done
    return CacheVerification(checked, corrupt, missing, rebuilt, removed, stale)
