"""The header index: what checking each image found, kept between launches (since 0.3).

Before step 1 a run checks every image's NIfTI headers (``data.check:
files``); ``umbrella validate`` also decodes each image. Over 100,000 images
that is minutes, paid again on every launch and every ``--resume`` after a
preemption. The index keeps each check's outcome (the problem messages, and
a windowed series' frame count), so a relaunch reads only the headers of
files that are new or changed.

An entry is keyed by a hash of everything the outcome depends on: each
file's absolute path, size, modification time, inode and status-change time
(and those of the files the loader reads beside it,
``ModalitySpec.companions``); the modality's name, shape, patch size,
channels and the settings bound to its loader and window functions; and the
version of the plugin that provides it. A changed,
replaced or touched file, another geometry or another plugin version is a
miss, so nothing stale is served; a missing file is never indexed, nor one
changed in the last two seconds (a second change within the filesystem's
timestamp resolution would not show).

Storage: JSON shards in one folder (``data.header_index``, by default
``$UMBRELLA_CACHE/headers``). A launch that checked new images writes them as
one new shard, to a temporary name renamed into place; when there are more
than :data:`MAX_SHARDS`, it merges them into one. Only renames are relied
upon, no locks, so ranks, nodes and concurrent runs may share the folder on a
network filesystem: a shard being merged away while another process reads
the folder only costs that process a re-read of some headers.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from umbrella_core.constants import CHECKS_VERSION, IMAGING_VERSION
from umbrella_core.data.cache import bound_settings
from umbrella_core.types import ModalitySpec

__all__ = ["HeaderIndex", "ImageKey", "default_index_root", "MAX_SHARDS"]

#: Shards a folder may hold before a launch merges them.
MAX_SHARDS = 16
#: Files changed more recently than this (ns) are checked but not saved (as
#: git's "racily clean" entries): their timestamps may not show the next change.
RACY_NS = 2_000_000_000
#: 2: each shard holds the sha256 of its entries, checked when read.
FORMAT = 2
_SUFFIX = ".json"

#: (modality, paths): one image as the checks see it.
ImageKey = tuple[str, tuple[str, ...]]


def default_index_root() -> Path:
    """``$UMBRELLA_CACHE/headers`` (``~/.cache/umbrella/headers`` by default)."""
    from umbrella_core.data.demo import demo_cache_dir

    return demo_cache_dir() / "headers"


def spec_identity(spec: ModalitySpec, version: str) -> str:
    """What of a modality a check's outcome depends on, as one string."""
    windows = spec.windows
    return json.dumps(
        [
            spec.name,
            spec.ndim,
            list(spec.shape),
            list(spec.patch_size),
            spec.channels,
            bound_settings(spec.load),
            bound_settings(windows.frames) if windows else None,
            bound_settings(windows.series) if windows else None,
            windows.stride if windows else None,
            version,
            # Version 1's identities are those of earlier versions.
            *([IMAGING_VERSION] if IMAGING_VERSION != 1 else []),
            CHECKS_VERSION,
        ]
    )


class HeaderIndex:
    """Check outcomes by image, loaded from and saved to ``root`` (None: kept in memory only).

    Args:
        root: The index folder.
        versions: Modality name → ``distribution==version`` of its plugin.
        log: Where a failure to read or write the folder is reported (one
            ``warning:`` line); the checks then simply run.
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | None,
        versions: Mapping[str, str],
        *,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.root = None if root is None else Path(root).expanduser()
        self.versions = dict(versions)
        self.log = log or (lambda message: print(message, file=sys.stderr, flush=True))
        self.entries: dict[str, dict[str, Any]] = {}
        self._new: dict[str, dict[str, Any]] = {}
        self._shards: list[Path] = []
        self._identities: dict[str, str] = {}
        self._racy: set[str] = set()
        self._keys: dict[tuple[str, tuple[str, ...]], str | None] = {}
        self._folders: dict[str, int] = {}
        self._companions: dict[str, list[list[str]]] = {}
        self._stale: set[str] = set()
        self.hits = 0
        self.misses = 0
        if self.root is not None:
            self._load()

    @classmethod
    def for_setting(
        cls,
        setting: str,
        versions: Mapping[str, str],
        *,
        log: Callable[[str], None] | None = None,
    ) -> HeaderIndex:
        """The index ``data.header_index`` names: a folder, ``""`` (the default) or ``off``."""
        # YAML reads a bare `off` as False, which the configuration holds as "no".
        if setting.strip().lower() in ("off", "no", "false", "none"):
            return cls(None, versions, log=log)
        return cls(setting or default_index_root(), versions, log=log)

    # -- storage -------------------------------------------------------------------

    def _load(self) -> None:
        assert self.root is not None  # __init__ loads an index that has a root
        try:
            shards = sorted(p for p in self.root.glob(f"*{_SUFFIX}") if not p.name.startswith("."))
        except OSError as error:
            self.log(f"warning: header index {self.root}: cannot be read ({error}); not used")
            self.root = None
            return
        for shard in shards:
            try:
                data = json.loads(shard.read_text())
            except FileNotFoundError:
                continue  # merged away by another process meanwhile
            except (OSError, ValueError) as error:
                self.log(f"warning: header index shard {shard}: unreadable ({error}); ignored")
                continue
            if not isinstance(data, dict) or data.get("format") != FORMAT:
                continue  # another version's shard: its outcomes are checked again
            entries = data.get("entries")
            why = _shard_problem(entries, data.get("sha256"))
            if why or not isinstance(entries, dict):
                self.log(f"warning: header index shard {shard}: {why}; ignored")
                continue
            self.entries.update(entries)
            self._shards.append(shard)

    def save(self) -> Path | None:
        """Write this launch's new entries as one shard (merging all when there are many)."""
        if self.root is None or not self._new:
            return None
        merge = len(self._shards) + 1 > MAX_SHARDS
        entries = self.entries if merge else self._new
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=_SUFFIX, dir=self.root)
            with os.fdopen(fd, "w") as handle:
                shard_data = {"format": FORMAT, "sha256": _digest(entries), "entries": entries}
                json.dump(shard_data, handle, separators=(",", ":"))
            name = f"{time.time_ns():020d}-{os.getpid()}{_SUFFIX}"
            shard = self.root / name
            os.replace(tmp, shard)
        except OSError as error:
            self.log(f"warning: header index {self.root}: cannot be written ({error})")
            return None
        if merge:
            for old in self._shards:
                try:
                    old.unlink()
                except OSError:
                    pass  # another process merged it first
            self._shards = []
        self._shards.append(shard)
        self._new = {}
        return shard

    # -- keys ----------------------------------------------------------------------

    def key(self, spec: ModalitySpec, paths: Sequence[str]) -> str | None:
        """The entry of one image, or None when a file is missing (never indexed)."""
        identity = self._identities.get(spec.name)
        if identity is None:
            identity = self._identities[spec.name] = spec_identity(
                spec, self.versions.get(spec.name, "")
            )
        # Looked up again by the screening that follows the first check: the
        # files are stat'ed (and their companions looked for) once a launch.
        memo = (identity, tuple(paths))
        if memo in self._keys:
            return self._keys[memo]
        key = self._keys[memo] = self._key(spec, paths, identity)
        return key

    def _key(self, spec: ModalitySpec, paths: Sequence[str], identity: str) -> str | None:
        # The files and their folders' mtimes make the key; the companions a
        # loader finds next to the files (ModalitySpec.companions) are looked
        # for only when a folder changed (a mask added or removed changes its
        # mtime), else checked by stat against those the entry recorded:
        # looking for ten mask names beside each of 50,000 T1 files was most
        # of a relaunch's check.
        parts = [str(FORMAT), identity]
        newest = 0
        try:
            for path in paths:
                stamp, mtime = _stamp(path)
                folder = os.path.dirname(os.path.abspath(path))
                folder_mtime = self._folders.get(folder)
                if folder_mtime is None:
                    folder_mtime = self._folders[folder] = os.stat(folder).st_mtime_ns
                parts += [stamp, str(folder_mtime)]
                newest = max(newest, mtime, folder_mtime)
        except OSError:
            return None
        key = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]
        entry = self.entries.get(key)
        known = None if entry is None else entry.get("companions")
        try:
            if known is not None and all(_stamp(c)[0] == stamp for c, stamp in known):
                found = known
            else:
                if entry is not None:
                    self._stale.add(key)  # a companion changed in place
                names = spec.companions(spec, tuple(paths)) if spec.companions else []
                found = [[c, _stamp(c)[0]] for c in names]
            newest = max([newest, *(_stamp(c)[1] for c, _ in found)])
        except OSError:
            return None
        self._companions[key] = found
        if time.time_ns() - newest < RACY_NS:
            # Written moments ago: a rewrite within the filesystem's timestamp
            # resolution, same size, would look unchanged. Used, not saved.
            self._racy.add(key)
        return key

    def get(self, key: str | None) -> dict[str, Any] | None:
        if key is None or key in self._stale:
            return None
        return self.entries.get(key)

    def put(self, key: str | None, entry: dict[str, Any]) -> None:
        if key is not None:
            entry = {**entry, "companions": self._companions.get(key, [])}
            self._stale.discard(key)
            self.entries[key] = entry
            if key not in self._racy:
                self._new[key] = entry

    # -- checks --------------------------------------------------------------------

    def check_images(
        self,
        keys: Iterable[ImageKey],
        specs: Mapping[str, ModalitySpec],
        *,
        decode: bool,
        workers: int = 0,
        progress: bool = False,
        log: Callable[[str], None] | None = None,
    ) -> dict[ImageKey, list[str]]:
        """Each image's problems (:func:`~umbrella_core.data.checks.check_image`), indexed.

        Images the index holds are not opened. The others are checked in
        parallel, ``workers`` processes (threads when fewer than 2, or for a
        few images), with a progress bar when ``progress`` and standard error
        is a terminal, and are added to the index (:meth:`save` writes it).
        """
        field = "decoded" if decode else "headers"
        out: dict[ImageKey, list[str]] = {}
        todo: list[tuple[ImageKey, str | None]] = []
        for image in dict.fromkeys(keys):
            spec = specs.get(image[0])
            key = self.key(spec, image[1]) if spec is not None else None
            entry = self.get(key)
            if entry is not None and field in entry:
                out[image] = list(entry[field])
                self.hits += 1
            else:
                todo.append((image, key))
        self.misses += len(todo)
        if not todo:
            return out
        if log is not None and len(todo) >= 1000:
            how = f"{workers} processes" if workers >= 2 else "threads"
            log(
                f"checking {len(todo):,} image(s) not in the header index ({how}); "
                f"{self.hits:,} indexed"
            )
        found = _check_all([image for image, _ in todo], specs, decode, workers, progress)
        for (image, key), (messages, frames) in zip(todo, found, strict=True):
            out[image] = messages
            entry = dict(self.get(key) or {})
            entry[field] = messages
            if frames is not None:
                entry["frames"] = frames
            self.put(key, entry)
        return out

    def frames(self, spec: ModalitySpec, paths: Sequence[str]) -> int:
        """``spec.windows.frames(spec, paths)``, from the index when it holds them."""
        key = self.key(spec, paths)
        entry = self.get(key)
        if entry is not None and entry.get("frames") is not None:
            return int(entry["frames"])
        assert spec.windows is not None  # asked of windowed modalities only
        frames = spec.windows.frames(spec, tuple(paths))
        self.put(key, {**(entry or {}), "frames": int(frames)})
        return frames


def _digest(entries: Mapping[str, Any]) -> str:
    """The sha256 of a shard's entries (as canonical JSON): an edited shard is not used."""
    text = json.dumps(entries, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _shard_problem(entries: Any, digest: Any) -> str | None:
    """Why a shard's entries may not be used (their shape, their checksum), or None."""
    if not isinstance(entries, dict):
        return f"its entries are a {type(entries).__name__}, not an object"
    for key, entry in entries.items():
        if not isinstance(entry, dict) or not all(
            isinstance(entry.get(field, []), list) for field in ("headers", "decoded")
        ):
            return f"entry {str(key)[:40]!r} has a wrong shape"
        frames = entry.get("frames")
        if frames is not None and (isinstance(frames, bool) or not isinstance(frames, int)):
            return f"entry {str(key)[:40]!r} has a wrong shape"
    if digest != _digest(entries):
        return "its checksum does not match its entries (edited or damaged)"
    return None


def _stamp(path: str) -> tuple[str, int]:
    """A file's identity (path, size, mtime, inode, ctime) and its mtime; OSError when missing.

    Inode and ctime too: a file replaced by a rename, or rewritten and given
    its old mtime back (rsync -t, touch -r), is a change.
    """
    st = os.stat(path)
    stamp = (
        f"{os.path.abspath(path)}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\0{st.st_ctime_ns}"
    )
    return stamp, st.st_mtime_ns


def _check_one(spec: ModalitySpec | None, paths: tuple[str, ...], decode: bool) -> Any:
    from umbrella_core.data.checks import check_image
    from umbrella_core.errors import DataError
    from umbrella_core.imaging import missing_file_message

    if spec is None:
        return [missing_file_message(p) for p in paths if not os.path.isfile(p)], None
    messages = check_image(spec, paths, decode=decode)
    frames = None
    if not messages and spec.windowed:
        assert spec.windows is not None  # windowed
        try:
            frames = int(spec.windows.frames(spec, paths))
        except DataError:
            frames = None
    return messages, frames


def _check_chunk(
    chunk: list[ImageKey], specs: Mapping[str, ModalitySpec], decode: bool
) -> list[Any]:
    return [_check_one(specs.get(modality), paths, decode) for modality, paths in chunk]


def _check_all(
    images: list[ImageKey],
    specs: Mapping[str, ModalitySpec],
    decode: bool,
    workers: int,
    progress: bool,
) -> list[Any]:
    from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor

    from tqdm.auto import tqdm

    size = 64
    chunks = [images[i : i + size] for i in range(0, len(images), size)]
    pool: Executor
    if workers >= 2 and len(chunks) > 1:
        import multiprocessing

        # Fork: the specs (plugin functions) need no import in the workers.
        context = multiprocessing.get_context("fork")
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=context)
    else:
        # Reading headers waits on the filesystem as much as it computes:
        # threads overlap the waits on network filesystems.
        pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))
    bar = tqdm(
        total=len(images),
        desc="checking images",
        unit="image",
        disable=not progress or not sys.stderr.isatty(),
        leave=False,
    )
    results: list[Any] = []
    with pool, bar:
        futures = [pool.submit(_check_chunk, chunk, specs, decode) for chunk in chunks]
        for future, chunk in zip(futures, chunks, strict=True):
            results.extend(future.result())
            bar.update(len(chunk))
    return results
