"""The preprocessed cache: built once, reused, invalidated when inputs change."""

from __future__ import annotations

import os

import numpy as np
import pytest

from umbrella_core.data.cache import PreprocessedCache, build_cache
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
    done, problems = build_cache(cache, [(spec, p) for p in images] * 2, workers=2)
    assert (done, problems) == (4, [])
    assert cache.info() == {
        "toy": {"entries": 4, "bytes": pytest.approx(4 * (128 + 8**3 * 4), abs=512)}
    }
    for paths in images:
        cache.load(spec, paths)
    assert cache.stats.hits == 4 and not list((tmp_path / "cache").rglob(".tmp-*"))


def test_build_reports_bad_files_and_keeps_going(tmp_path, study):
    spec, images = study
    with open(images[1][0], "wb") as handle:
        handle.write(b"not a nifti")
    done, problems = build_cache(PreprocessedCache(tmp_path / "c", {}), [(spec, p) for p in images])
    assert done == 3 and len(problems) == 1 and os.path.basename(images[1][0]) in problems[0]


def test_cache_build_command_then_training_reads_from_it(tmp_path, monkeypatch):
    from umbrella_core.cli import main

    monkeypatch.setenv("UMBRELLA_CACHE", str(tmp_path / "home"))
    args = ["--modalities", "dmri", "--set", "data.demo_subjects=3"]
    assert main(["cache", "build", *args, "--workers", "2"]) == 0
    info = PreprocessedCache(tmp_path / "home" / "preprocessed", {}).info()
    assert info["dmri"]["entries"] == 3
    assert main(["cache", "build", *args]) == 0  # nothing new to do
    assert PreprocessedCache(tmp_path / "home" / "preprocessed", {}).info() == info
