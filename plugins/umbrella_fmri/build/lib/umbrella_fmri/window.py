"""One window of a BOLD series, read without preprocessing the whole series.

A window is z-scored with the statistics of its whole series (``bold_series``),
so reading it alone needs them: they are computed the first time a window of a
series is read (the whole series is decoded once, as without this module) and
saved, ``(3, x, y, z)`` float32 (mean, z-score factor, background) with their
CRC-32, in ``$UMBRELLA_CACHE/series/fmri`` (:func:`~umbrella_core.imaging.default_series_root`).
Later windows read only the frames they are made of
(:func:`~umbrella_fmri.preprocess.prepare_series`: for a ``.nii.gz``, through a
saved gzip index), and give exactly the values ``bold_series`` gives them.

A saved entry is named by everything its statistics depend on: the file's
fingerprint (path, size, modification time, gzip trailer), the repetition
times (of the file, sidecar included, and the target), the spatial shape, the
plugin's version and this format. A changed file or setting is a miss; a
damaged entry (its CRC-32 does not match) is recomputed. A folder that cannot
be written makes every window cost the whole series, as without this module,
and says so once.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from umbrella_core import DataError, ModalitySpec
from umbrella_core.imaging import default_series_root, file_fingerprint
from umbrella_fmri import __version__
from umbrella_fmri.preprocess import (
    BACKGROUND_FRACTION,
    CHUNK,
    _one_series,
    _target_tr,
    bold_frames,
    normalise,
    prepare_series,
    statistics,
)

__all__ = ["bold_window", "STATS_FORMAT"]

#: Bumped when what a saved entry holds, or how it is computed, changes.
STATS_FORMAT = 1

_warned: set[str] = set()


def bold_window(
    spec: ModalitySpec,
    paths: str | os.PathLike[str] | Sequence[str],
    index: int,
    *,
    target_tr: float | None = None,
    max_tr: float | None = None,
    root: str | os.PathLike[str] | None = None,
) -> np.ndarray:
    """Window ``index`` of the series, ``(1, *spec.shape)`` float32: ``Windows.window``.

    Equal to ``bold_series(spec, paths, ...)[..., spec.window_slice(index)]``.

    Args:
        spec: The ``fmri`` modality with the run's geometry and stride.
        paths: One file.
        index: The window.
        target_tr, max_tr: As :func:`~umbrella_fmri.preprocess.bold_series`.
        root: Where the statistics (``fmri/``) and gzip indexes (``gzip/``) are
            kept; None: :func:`~umbrella_core.imaging.default_series_root`.

    Raises:
        DataError: As ``bold_series``, and a window the series does not have.
            Names the file.
    """
    path = _one_series(spec, paths)
    count = bold_frames(spec, path, target_tr=target_tr, max_tr=max_tr)
    length = spec.shape[3]
    if count < length:
        raise DataError(
            f"{path}: the series has {count} frames, fewer than the {length} "
            f"frames of one model input; use a longer series or a shorter window"
        )
    window = spec.window_slice(index)
    if index < 0 or window.stop > count:
        raise DataError(
            f"{path}: window {index} does not exist; the series gives "
            f"{spec.window_count(count)} windows"
        )
    folder = Path(root) if root is not None else default_series_root()
    entry = folder / "fmri" / f"{_key(spec, path, target_tr, max_tr)}.npz"
    stats = _load(entry, spec.shape[:3])
    if stats is None:
        prepared = prepare_series(spec, path, target_tr=target_tr, max_tr=max_tr)
        stats = statistics(prepared)
        _save(entry, stats)
        frames = prepared[..., window]
    else:
        frames = prepare_series(
            spec,
            path,
            target_tr=target_tr,
            max_tr=max_tr,
            start=window.start,
            stop=window.stop,
            index_dir=folder / "gzip",
        )
    return normalise(frames, stats)[np.newaxis]


def _key(spec: ModalitySpec, path: str, target_tr: float | None, max_tr: float | None) -> str:
    identity = [
        STATS_FORMAT,
        __version__,
        file_fingerprint(path),
        # The TR resampled from (None: not resampled) covers the JSON sidecar's.
        _target_tr(path, target_tr, max_tr),
        target_tr,
        list(spec.shape[:3]),
        CHUNK,
        BACKGROUND_FRACTION,
    ]
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:32]


def _load(entry: Path, shape: Sequence[int]) -> np.ndarray | None:
    """The saved statistics, or None when absent or damaged (then removed)."""
    try:
        with np.load(entry, allow_pickle=False) as saved:
            stats, crc = saved["stats"], saved["crc32"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, EOFError, zlib.error, zipfile.BadZipFile):
        entry.unlink(missing_ok=True)
        return None
    if (
        stats.dtype != np.float32
        or stats.shape != (3, *shape)
        or crc.shape != (1,)
        # mypy: numpy's stubs give ndarray __buffer__ on Python >= 3.12 only.
        or int(crc[0]) != zlib.crc32(np.ascontiguousarray(stats))  # type: ignore[arg-type]
    ):
        entry.unlink(missing_ok=True)
        return None
    return stats


def _save(entry: Path, stats: np.ndarray) -> None:
    stats = np.ascontiguousarray(stats, dtype=np.float32)
    # mypy: numpy's stubs give ndarray __buffer__ on Python >= 3.12 only.
    crc = np.array([zlib.crc32(stats)], dtype=np.uint32)  # type: ignore[arg-type]
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(dir=entry.parent, prefix=".tmp-", suffix=".npz")
        try:
            with os.fdopen(handle, "wb") as out:
                np.savez(out, stats=stats, crc32=crc)
            os.replace(tmp, entry)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as error:
        folder = str(entry.parent)
        if folder not in _warned:
            _warned.add(folder)
            print(
                f"warning: {folder}: cannot save fMRI series statistics ({error}); every "
                "window without the cache preprocesses its whole series (set UMBRELLA_CACHE "
                "to a writable folder)",
                file=sys.stderr,
                flush=True,
            )
