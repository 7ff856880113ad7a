"""A window of a BOLD series read alone (``Windows.window``) is that window of the whole series."""

from __future__ import annotations

import os
from pathlib import Path

import attrs
import numpy as np
import pytest
from nibabel.testing import data_path
from umbrella_fmri import plugin
from umbrella_fmri import preprocess as preprocess_module
from umbrella_fmri.plugin import FMRI

from umbrella_core import DataError, imaging
from umbrella_core.data.dataset import load_image

EXAMPLE4D = os.path.join(data_path, "example4d.nii.gz")
FUNCTIONAL = os.path.join(data_path, "functional.nii")

pytestmark = pytest.mark.usefixtures("umbrella_cache")  # statistics and indexes go there


def _spec(shape=(16, 16, 16, 8), patch=(8, 8, 8, 4), stride=6):
    # A stride that is not a multiple of preprocess.CHUNK: windows start mid-chunk.
    spec = FMRI.with_geometry(shape, patch)
    return attrs.evolve(spec, windows=attrs.evolve(spec.windows, stride=stride))


def _series(path: Path, seed: int = 0, frames: int = 44) -> str:
    rng = np.random.default_rng(seed)
    data = (1000 + 50 * rng.standard_normal((20, 20, 12, frames))).astype(np.int16)
    data[..., ::2] += 30  # a signal that alternates frame by frame
    data[:4] = 3  # background: below the threshold, set to 0
    return imaging.save_nifti(path, data, np.diag([-3.0, 3.0, 3.0, 1.0]), tr=2.0)


def _windows(spec, path: str) -> list[np.ndarray]:
    count = spec.window_count(spec.windows.frames(spec, (path,)))
    return [spec.windows.window(spec, (path,), index) for index in range(count)]


@pytest.mark.parametrize("target_tr", [None, 1.5, 3.0])  # the file's TR is 2 s
def test_a_window_read_alone_is_the_window_of_the_whole_series(
    tmp_path: Path, monkeypatch, target_tr
) -> None:
    spec = _spec() if target_tr is None else plugin.with_target_tr(_spec(), target_tr)
    path = _series(tmp_path / "sub-01_bold.nii.gz")
    series = spec.windows.series(spec, (path,))
    reads = []
    real = preprocess_module.read_frames
    monkeypatch.setattr(
        preprocess_module,
        "read_frames",
        lambda p, a, b, **kw: reads.append(b - a) or real(p, a, b, **kw),
    )
    windows = _windows(spec, path)
    assert len(windows) >= 4
    for index, window in enumerate(windows):
        assert np.array_equal(window, series[..., spec.window_slice(index)])
    # The first window decodes the series once; every later one reads some frames only
    # (those of the 8-frame runs it overlaps, and their neighbours in time).
    assert reads[0] == 44 and max(reads[1:]) < 44, reads
    if target_tr is None:
        assert max(reads[1:]) <= 16, reads


def test_load_image_reads_the_window_alone_and_the_cache_agrees(tmp_path: Path) -> None:
    from umbrella_core.data.cache import PreprocessedCache

    spec = _spec(stride=8)
    path = _series(tmp_path / "sub-01_bold.nii.gz")
    cache = PreprocessedCache(tmp_path / "cache", {"fmri": "test"})
    for index in (3, 0, 4):
        alone = load_image(spec, (path,), window=index).numpy()
        cached = load_image(spec, (path,), cache=cache, window=index).numpy()
        assert np.array_equal(alone, cached)


def test_windows_of_real_bold_series_read_alone(tmp_path: Path) -> None:
    # example4d.nii.gz (gzip): 2 frames, TR labelled 2000 s (max_tr lets it through);
    # functional.nii (plain): 20 frames. Both LAS, so the reads are flipped to RAS.
    gz = plugin.configure(_spec((32, 32, 16, 1), (8, 8, 8, 1), stride=1), {"max_tr": 3000})
    plain = _spec((16, 16, 8, 4), (8, 8, 4, 4), stride=3)
    for spec, path, count in ((gz, EXAMPLE4D, 2), (plain, FUNCTIONAL, 6)):
        series = spec.windows.series(spec, (path,))
        windows = _windows(spec, path) + _windows(spec, path)  # the second time: all saved
        assert len(windows) == 2 * count
        for index, window in enumerate(windows):
            assert np.array_equal(window, series[..., spec.window_slice(index % count)])


def test_a_changed_series_is_not_read_with_its_old_statistics(tmp_path: Path) -> None:
    spec = _spec()
    path = _series(tmp_path / "sub-01_bold.nii.gz", seed=0)
    first = spec.windows.window(spec, (path,), 2)
    stamp = os.stat(path).st_mtime_ns
    _series(tmp_path / "sub-01_bold.nii.gz", seed=1)
    os.utime(path, ns=(stamp, stamp))
    again = spec.windows.window(spec, (path,), 2)
    assert not np.array_equal(first, again)
    assert np.array_equal(again, spec.windows.series(spec, (path,))[..., spec.window_slice(2)])


def test_damaged_saved_statistics_are_recomputed(tmp_path: Path, umbrella_cache: Path) -> None:
    spec = _spec()
    path = _series(tmp_path / "sub-01_bold.nii.gz")
    spec.windows.window(spec, (path,), 0)
    (saved,) = (umbrella_cache / "series" / "fmri").glob("*.npz")
    raw = bytearray(saved.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one byte of the statistics
    saved.write_bytes(bytes(raw))
    window = spec.windows.window(spec, (path,), 3)
    assert np.array_equal(window, spec.windows.series(spec, (path,))[..., spec.window_slice(3)])


def test_a_truncated_series_gives_the_error_naming_the_file(tmp_path: Path) -> None:
    spec = _spec()
    path = _series(tmp_path / "sub-01_bold.nii.gz")
    assert load_image(spec, (path,), window=1).shape == (1, 16, 16, 16, 8)
    raw = Path(path).read_bytes()
    Path(path).write_bytes(raw[: len(raw) // 2])
    for index in (0, 5):
        with pytest.raises(DataError, match=r"sub-01_bold.nii.gz: cannot decode the image data"):
            load_image(spec, (path,), window=index)


def test_a_window_the_series_does_not_have_is_refused(tmp_path: Path) -> None:
    spec = _spec()
    path = _series(tmp_path / "sub-01_bold.nii.gz")
    missing = r"sub-01_bold.nii.gz: window 7 does not exist; the series gives 7 windows"
    with pytest.raises(DataError, match=missing):
        spec.windows.window(spec, (path,), 7)
