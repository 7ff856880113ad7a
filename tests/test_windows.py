"""Windowed modalities: a long fMRI series gives one sample per window."""

from __future__ import annotations

import attrs
import numpy as np
import pytest

from umbrella_core.data.cache import PreprocessedCache
from umbrella_core.data.conversation import Tokenization
from umbrella_core.data.dataset import RecordDataset, load_image
from umbrella_core.errors import DataError
from umbrella_core.imaging import save_nifti
from umbrella_core.model.tokenizer import build_byte_tokenizer
from umbrella_core.plugins import get_plugin_manager
from umbrella_core.types import ImageRef, StudyRecord, Turn


@pytest.fixture
def fmri():
    spec = get_plugin_manager().resolve_modality("fmri").item
    return attrs.evolve(
        spec.with_geometry((16, 16, 16, 8), (8, 8, 8, 4)),
        windows=attrs.evolve(spec.windows, stride=8),
    )


@pytest.fixture
def series_file(tmp_path):
    rng = np.random.default_rng(0)
    frames = 44
    data = (1000 + 50 * rng.standard_normal((20, 20, 12, frames))).astype(np.int16)
    data[..., ::2] += 30  # a signal that alternates frame by frame
    return save_nifti(
        tmp_path / "sub-01_task-rest_bold.nii.gz", data, np.diag([3, 3, 3, 1]), tr=2.0
    )


def _record(path):
    return StudyRecord(
        subject="sub-01",
        images=[ImageRef(modality="fmri", paths=[path])],
        turns=[Turn(role="user", content="<image>\nRest?"), Turn(role="assistant", content="yes")],
        source="test",
    )


@pytest.mark.usefixtures("umbrella_cache")  # windows read alone save statistics
def test_a_long_series_gives_one_sample_per_window(fmri, series_file):
    dataset = RecordDataset(
        [_record(series_file)],
        {"fmri": fmri},
        Tokenization.of(build_byte_tokenizer(), 4, {"fmri": fmri}, 512),
    )
    assert len(dataset) == 1 + (44 - 8) // 8 == 5
    windows = [dataset[i]["images"][0][1].numpy() for i in range(len(dataset))]
    whole = fmri.windows.series(fmri, (series_file,))[0]
    for i, window in enumerate(windows):
        assert window.shape == (1, 16, 16, 16, 8)
        assert np.allclose(window[0], whole[..., 8 * i : 8 * i + 8])
    # One z-score over the whole series: windows are not each re-centred.
    assert not np.allclose(windows[0].mean(axis=-1), 0, atol=1e-3)


@pytest.mark.usefixtures("umbrella_cache")  # windows read alone save statistics
def test_cached_window_equals_uncached_and_reads_only_its_frames(fmri, series_file, tmp_path):
    cache = PreprocessedCache(tmp_path / "cache", {"fmri": "test"})
    for index in range(5):
        direct = load_image(fmri, (series_file,), window=index).numpy()
        cached = load_image(fmri, (series_file,), cache=cache, window=index).numpy()
        assert np.array_equal(direct, cached)
    assert cache.stats.misses == 1 and cache.stats.hits == 4
    (entry,) = (tmp_path / "cache" / "fmri").glob("*-w8s8.npy")
    stored = np.load(entry, mmap_mode="r")
    assert stored.shape == (5, 1, 16, 16, 16, 8)  # window-major: one window is one block


def test_series_shorter_than_a_window_is_refused_naming_the_file(fmri, tmp_path):
    short = save_nifti(tmp_path / "short_bold.nii.gz", np.zeros((8, 8, 8, 5), np.int16), np.eye(4))
    with pytest.raises(DataError, match=r"short_bold.nii.gz: 5 frames, fewer than the 8"):
        RecordDataset(
            [_record(short)],
            {"fmri": fmri},
            Tokenization.of(build_byte_tokenizer(), 4, {"fmri": fmri}, 512),
        )


def test_demo_geometry_takes_one_window_per_file(fmri):
    assert not fmri.for_demo().windowed
    assert fmri.windowed and fmri.window_count(44) == 5 and fmri.window_count(7) == 0


def test_repetition_time_from_sidecar_or_header_and_resampling(fmri, series_file, tmp_path):
    import json

    from umbrella_fmri.plugin import with_target_tr
    from umbrella_fmri.preprocess import repetition_time

    assert repetition_time(series_file) == pytest.approx(2.0)  # header, seconds
    sidecar = tmp_path / "sub-01_task-rest_bold.json"
    sidecar.write_text(json.dumps({"RepetitionTime": 1.0}))
    assert repetition_time(series_file) == pytest.approx(1.0)  # the sidecar wins
    sidecar.unlink()
    faster = with_target_tr(fmri, 1.0)  # 2 s -> 1 s: twice the frames
    assert faster.windows.frames(faster, (series_file,)) == 87
    series = faster.windows.series(faster, (series_file,))
    assert series.shape == (1, 16, 16, 16, 87)
    cache = PreprocessedCache(tmp_path / "cache", {"fmri": "test"})
    assert cache.key(faster, (series_file,), series=True) != cache.key(
        fmri, (series_file,), series=True
    )
    no_tr = save_nifti(tmp_path / "nott_bold.nii.gz", np.zeros((8, 8, 8, 20), np.int16), np.eye(4))
    import nibabel as nib

    img = nib.load(no_tr)
    img.header.set_zooms((1.0, 1.0, 1.0, 0.0))
    nib.save(img, no_tr)
    with pytest.raises(DataError, match=r"nott_bold.nii.gz: no repetition time"):
        faster.windows.frames(faster, (no_tr,))
