"""The preprocessed cache: built once, reused, invalidated when inputs change."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time

import numpy as np
import pytest

from umbrella_core.data import cache as cache_module
from umbrella_core.data.cache import PreprocessedCache
from umbrella_core.data.cache_build import build_cache, verify_cache
from umbrella_core.data.dataset import load_image
from umbrella_core.data.demo import write_demo
from umbrella_core.data.manifest import read_manifest
from umbrella_core.testing import toy_modality


@pytest.fixture
def study(tmp_path):
    spec = toy_modality("toy", shape=(8, 8, 8), patch_size=(4, 4, 4))
    manifest = write_demo(tmp_path / "study", {"toy": spec}, subjects=4)
    records = list(read_manifest(manifest))
    return spec, [tuple(r.images[0].paths) for r in records]


class CountingLoads:
    def __init__(self, spec):
        self.calls = 0
        self.load = spec.load

    def __call__(self, spec, paths):
        self.calls += 1
        return self.load(spec, paths)


def test_second_load_comes_from_the_cache_bit_identical(tmp_path, study):
    import attrs

    spec, images = study
    counter = CountingLoads(spec)
    spec = attrs.evolve(spec, load=counter)
    cache = PreprocessedCache(tmp_path / "cache", {"toy": "toy==1"})
    first = [load_image(spec, paths, cache=cache) for paths in images]
    assert counter.calls == 4 and cache.stats.misses == 4
    again = PreprocessedCache(tmp_path / "cache", {"toy": "toy==1"})  # as another process would
    second = [load_image(spec, paths, cache=again) for paths in images]
    assert counter.calls == 4 and again.stats.hits == 4
    for a, b in zip(first, second, strict=True):
        assert np.array_equal(a.numpy(), b.numpy())
    direct = load_image(spec, images[0])
    assert np.array_equal(direct.numpy(), first[0].numpy())


def test_changed_file_geometry_or_plugin_version_misses(tmp_path, study):
    spec, images = study
    cache = PreprocessedCache(tmp_path / "cache", {"toy": "toy==1"})
    key = cache.key(spec, images[0])
    assert cache.key(spec.with_geometry((16, 16, 16)), images[0]) != key
    assert PreprocessedCache(tmp_path / "cache", {"toy": "toy==2"}).key(spec, images[0]) != key
    stat = os.stat(images[0][0])
    os.utime(images[0][0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert cache.key(spec, images[0]) != key


def test_build_in_two_processes_then_everything_hits(tmp_path, study):
    spec, images = study
    cache = PreprocessedCache(tmp_path / "cache", {"toy": "toy==1"})
    built = build_cache(cache, [(spec, p) for p in images] * 2, workers=2)
    assert (built.done, built.problems, built.rebuilt) == (4, [], 0)
    # header + array + checksum trailer (JSON naming the source file)
    assert cache.info() == {
        "toy": {"entries": 4, "bytes": pytest.approx(4 * (128 + 8**3 * 4), abs=4 * 512)}
    }
    for paths in images:
        cache.load(spec, paths)
    assert cache.stats.hits == 4 and not list((tmp_path / "cache").rglob(".tmp-*"))


def test_build_reports_bad_files_and_keeps_going(tmp_path, study):
    spec, images = study
    with open(images[1][0], "wb") as handle:
        handle.write(b"not a nifti")
    built = build_cache(PreprocessedCache(tmp_path / "c", {}), [(spec, p) for p in images])
    assert built.done == 3 and len(built.problems) == 1
    assert os.path.basename(images[1][0]) in built.problems[0]


def test_cache_build_command_then_training_reads_from_it(tmp_path, monkeypatch):
    from umbrella_core.commands import main

    monkeypatch.setenv("UMBRELLA_CACHE", str(tmp_path / "home"))
    args = ["--modalities", "dmri", "--set", "data.demo_subjects=3"]
    assert main(["cache", "build", *args, "--workers", "2"]) == 0
    info = PreprocessedCache(tmp_path / "home" / "preprocessed", {}).info()
    assert info["dmri"]["entries"] == 3
    assert main(["cache", "build", *args]) == 0  # nothing new to do
    assert PreprocessedCache(tmp_path / "home" / "preprocessed", {}).info() == info


# --- the cache does not trust its contents ------------------------------------


def _built(tmp_path, study):
    spec, images = study
    cache = PreprocessedCache(tmp_path / "cache", {"toy": "toy==1"})
    assert build_cache(cache, [(spec, p) for p in images]).done == 4
    return spec, images, cache


def _spoil(entry, how):
    """Corrupt an entry as a bad disk, a stray tool or a wrong copy would."""
    stored = np.load(entry, mmap_mode="r")
    shape, offset = stored.shape, stored.offset
    del stored
    if how == "zeroed":  # the bytes zeroed in place: header and checksum trailer intact
        values = np.zeros(shape, np.float32)
    elif how == "noise":
        values = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    elif how == "nan":
        values = np.array(np.load(entry))
        values.flat[7] = np.nan
    if how == "overwritten":  # np.save of a zeroed array of the right shape: no trailer
        np.save(entry, np.zeros(shape, np.float32))
        return
    with open(entry, "r+b") as handle:
        handle.seek(offset)
        handle.write(values.tobytes())


@pytest.mark.parametrize("how", ["zeroed", "noise", "overwritten", "nan"])
def test_corrupt_entry_of_the_right_shape_is_reported_and_rebuilt_on_read(tmp_path, study, how):
    spec, images, built = _built(tmp_path, study)
    entry = built.entry(spec, images[0])
    _spoil(entry, how)
    messages: list[str] = []
    cache = PreprocessedCache(tmp_path / "cache", {"toy": "toy==1"}, log=messages.append)
    array = np.array(cache.load(spec, images[0]))
    np.testing.assert_array_equal(array, spec.load(spec, images[0]))
    assert (cache.stats.rebuilt, cache.stats.misses, cache.stats.hits) == (1, 1, 0)
    (message,) = messages
    assert str(entry) in message and images[0][0] in message and "rebuilding" in message
    # Rebuilt in place: the next read (this process or another) is a clean hit.
    for again in (cache, PreprocessedCache(tmp_path / "cache", {"toy": "toy==1"})):
        np.testing.assert_array_equal(np.array(again.load(spec, images[0])), array)
    assert cache.stats.rebuilt == 1 and len(messages) == 1


def test_nan_entry_with_a_matching_checksum_is_rebuilt(tmp_path, study):
    # Written with NaN and a checksum of that content (an older or broken writer).
    spec, images, built = _built(tmp_path, study)
    entry = built.entry(spec, images[1])
    poisoned = np.array(np.load(entry))
    poisoned.flat[:5] = [np.nan, np.inf, -np.inf, np.nan, 0]
    with open(entry, "wb") as out:
        np.save(out, poisoned)
        out.write(cache_module._trailer(poisoned, spec, images[1]))
    assert built.check(entry) == "NaN or infinite values"
    messages: list[str] = []
    cache = PreprocessedCache(tmp_path / "cache", {"toy": "toy==1"}, log=messages.append)
    array = np.array(cache.load(spec, images[1]))
    assert np.isfinite(array).all() and cache.stats.rebuilt == 1
    np.testing.assert_array_equal(array, spec.load(spec, images[1]))
    assert "NaN" in messages[0] and images[1][0] in messages[0]


def test_loader_giving_nan_is_refused_naming_the_file_and_nothing_is_cached(tmp_path, study):
    import attrs

    from umbrella_core.errors import DataError

    spec, images = study
    spec = attrs.evolve(spec, load=lambda s, p: np.full(s.input_shape, np.nan, np.float32))
    cache = PreprocessedCache(tmp_path / "cache", {})
    with pytest.raises(DataError, match=os.path.basename(images[0][0]) + ".*NaN"):
        cache.load(spec, images[0])
    assert cache.info() == {} and not list((tmp_path / "cache").rglob(".tmp-*"))


def test_checksum_is_computed_on_the_first_read_per_process_only(tmp_path, study, monkeypatch):
    spec, images, _ = _built(tmp_path, study)
    calls = []
    real = cache_module.checksum
    monkeypatch.setattr(cache_module, "checksum", lambda a: calls.append(1) or real(a))
    cache = PreprocessedCache(tmp_path / "cache", {"toy": "toy==1"})
    for _ in range(3):
        cache.load(spec, images[0])
    assert len(calls) == 1 and cache.stats.hits == 3
    other = pickle.loads(pickle.dumps(cache))  # a DataLoader worker checks for itself
    other.load(spec, images[0])
    assert len(calls) == 2


def test_cache_build_rebuilds_corrupt_entries_and_says_so(tmp_path, study):
    spec, images, _ = _built(tmp_path, study)
    _spoil(PreprocessedCache(tmp_path / "cache", {"toy": "toy==1"}).entry(spec, images[2]), "noise")
    cache = PreprocessedCache(tmp_path / "cache", {"toy": "toy==1"}, log=lambda _: None)
    built = build_cache(cache, [(spec, p) for p in images])
    assert (built.done, built.rebuilt) == (4, 1)
    assert verify_cache(cache).corrupt == []


def test_cache_verify_reports_corrupt_entries_and_removes_them(tmp_path, study, capsys):
    from umbrella_core.commands import main

    spec, images, cache = _built(tmp_path, study)
    root = str(tmp_path / "cache")
    assert main(["cache", "verify", "--cache-dir", root]) == 0
    assert "4 entries checked" in capsys.readouterr().out
    spoiled = {how: cache.entry(spec, images[i]) for i, how in enumerate(["zeroed", "noise"])}
    for how, entry in spoiled.items():
        _spoil(entry, how)
    assert main(["cache", "verify", "--cache-dir", root, "--dry-run"]) == 1
    out = capsys.readouterr().out
    for i, entry in enumerate(spoiled.values()):
        assert f"{entry}: checksum mismatch" in out and images[i][0] in out
    assert "2 corrupt: left in place" in out and all(e.exists() for e in spoiled.values())
    assert main(["cache", "verify", "--cache-dir", root]) == 1
    assert "2 corrupt: 2 removed" in capsys.readouterr().out
    assert not any(e.exists() for e in spoiled.values())
    assert main(["cache", "verify", "--cache-dir", root]) == 0
    assert "2 entries checked" in capsys.readouterr().out


def test_verify_of_the_runs_images_rebuilds_corrupt_entries(tmp_path, study):
    spec, images, cache = _built(tmp_path, study)
    entry = cache.entry(spec, images[3])
    _spoil(entry, "overwritten")
    cache.entry(spec, images[0]).unlink()
    found = verify_cache(cache, [(spec, p) for p in images])
    assert (found.checked, found.missing, found.removed, found.rebuilt) == (3, 1, 1, 1)
    assert len(found.corrupt) == 1 and found.corrupt[0].startswith(f"{entry}: no checksum")
    assert images[3][0] in found.corrupt[0]
    assert cache.check(entry, spec.input_shape) is None
    np.testing.assert_array_equal(np.load(entry), spec.load(spec, images[3]))


def test_killed_builds_temporary_file_is_not_counted_and_is_removed(tmp_path, study, capsys):
    from umbrella_core.commands import main

    spec, images, cache = _built(tmp_path, study)
    folder = tmp_path / "cache" / "toy"
    expected = cache.info()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a writer that was killed: its pid is dead
    host = cache_module.socket.gethostname()
    dead = folder / f".tmp-{gone.pid}@{host}-abc123.npy"
    old = folder / ".tmp-1@elsewhere-def456.npy"  # another host's, two hours old
    live = folder / f".tmp-{os.getpid()}@{host}-ghi789.npy"  # a build still writing
    for path in (dead, old, live):
        path.write_bytes(b"\x93NUMPY" + bytes(1000))
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    assert cache.info() == expected
    assert main(["cache", "info", "--cache-dir", str(tmp_path / "cache")]) == 0
    out = capsys.readouterr().out
    assert "toy      4 images" in out and "removed 2 temporary file(s)" in out
    assert not dead.exists() and not old.exists() and live.exists()


def test_corrupt_window_is_found_by_its_own_checksum_and_rebuilt(tmp_path, monkeypatch):
    import attrs

    from umbrella_core.imaging import save_nifti
    from umbrella_core.plugins import get_plugin_manager

    spec = get_plugin_manager().resolve_modality("fmri").item
    fmri = attrs.evolve(
        spec.with_geometry((16, 16, 16, 8), (8, 8, 8, 4)),
        windows=attrs.evolve(spec.windows, stride=8),
    )
    data = (1000 + 50 * np.random.default_rng(0).standard_normal((20, 20, 12, 44))).astype(np.int16)
    bold = save_nifti(tmp_path / "sub-01_task-rest_bold.nii.gz", data, np.eye(4), tr=2.0)
    built = PreprocessedCache(tmp_path / "cache", {"fmri": "test"})
    direct = [np.array(built.window(fmri, (bold,), i)) for i in range(5)]
    entry = built.window_entry(fmri, (bold,))
    stored = np.load(entry, mmap_mode="r")
    offset, block = stored.offset, stored[0].nbytes
    del stored
    with open(entry, "r+b") as handle:  # window 3 zeroed in place
        handle.seek(offset + 3 * block)
        handle.write(bytes(block))
    assert "checksum mismatch in window 3" in verify_cache(built, dry_run=True).corrupt[0]
    calls = []
    real = cache_module.checksum
    monkeypatch.setattr(cache_module, "checksum", lambda a: calls.append(1) or real(a))
    messages: list[str] = []
    cache = PreprocessedCache(tmp_path / "cache", {"fmri": "test"}, log=messages.append)
    np.testing.assert_array_equal(cache.window(fmri, (bold,), 0), direct[0])
    assert cache.stats.hits == 1 and len(calls) == 1  # one window read: one window checked
    np.testing.assert_array_equal(cache.window(fmri, (bold,), 3), direct[3])
    assert cache.stats.rebuilt == 1 and str(entry) in messages[0] and bold in messages[0]
    assert verify_cache(cache, dry_run=True).corrupt == []
