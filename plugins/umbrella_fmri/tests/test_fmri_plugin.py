"""Tests of the fMRI plugin: its spec and hooks, its loader on phantoms and real series."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.testing import data_path
from umbrella_fmri import plugin
from umbrella_fmri.phantom import block_design, make_bold_phantom
from umbrella_fmri.plugin import FMRI
from umbrella_fmri.preprocess import BACKGROUND_FRACTION

from umbrella_core import DataError, imaging
from umbrella_core.testing import check_patch_embedder

ANATOMICAL = os.path.join(data_path, "anatomical.nii")
FUNCTIONAL = os.path.join(data_path, "functional.nii")
EXAMPLE4D = os.path.join(data_path, "example4d.nii.gz")
DEMO = FMRI.for_demo()


def _write(files, folder: Path, stem: str = "sub-01") -> list[str]:
    return [
        imaging.save_nifti(folder / f"{stem}_{f.suffix}.nii.gz", f.data, f.affine, tr=2.0)
        for f in files
    ]


def _activation_x(series: np.ndarray) -> int:
    """x index of the peak correlation with the task paradigm, averaged over y and z."""
    frames = series.shape[-1]
    paradigm = block_design(frames, 2.0)
    paradigm = (paradigm - paradigm.mean()) / paradigm.std()
    correlation = (series * paradigm).mean(axis=-1)
    return int(np.argmax(correlation.mean(axis=(1, 2))))


# ---------------------------------------------------------------------------
# Spec and hooks
# ---------------------------------------------------------------------------


def test_spec_metadata() -> None:
    assert FMRI.name == "fmri" and FMRI.ndim == 4 and FMRI.channels == 1
    assert set(FMRI.aliases) == {"bold", "rsfmri", "func"}
    assert FMRI.shape == (64, 64, 48, 24) and FMRI.num_tokens == 4 * 4 * 3 * 6
    assert DEMO.shape == (24, 24, 24, 8) and DEMO.num_tokens == 54
    assert "*_bold.nii.gz" in FMRI.file_patterns
    assert FMRI.demo.labels == ("left", "right")
    assert "hemisphere" in FMRI.demo.question


def _label_of(series: np.ndarray) -> str:
    # The label is the side that follows the task, not a voxel value: read it as a user would.
    return "left" if _activation_x(series[0]) < series.shape[1] // 2 else "right"


def test_passes_the_plugin_conformance_checks(umbrella_conformance) -> None:
    # Entry point, hooks, names and patterns, light import, embedder token count and
    # dispatch by name, and the activation side surviving save_nifti + load.
    checked = umbrella_conformance.modality_plugin(
        plugin, entry_point="fmri", label_of={"fmri": _label_of}
    )
    assert checked == [DEMO]


@pytest.mark.parametrize(
    "shape, patch, tokens",
    [((24, 24, 24, 8), (8, 8, 8, 4), 54), ((16, 16, 8, 12), (8, 8, 4, 4), 24)],
)
def test_patch_embedder_follows_the_configured_geometry(shape, patch, tokens) -> None:
    spec = FMRI.with_geometry(shape, patch)
    assert spec.num_tokens == tokens
    check_patch_embedder(plugin, spec, hidden_size=16)


# ---------------------------------------------------------------------------
# Phantom written to disk, then loaded
# ---------------------------------------------------------------------------


def test_phantom_is_twice_the_window_and_loads_z_scored(tmp_path: Path) -> None:
    files = DEMO.demo.phantom(DEMO, np.random.default_rng(0), "left")
    assert [f.suffix for f in files] == ["bold"]
    assert files[0].data.ndim == 4 and files[0].data.shape[3] == 2 * DEMO.shape[3]
    series = DEMO.load(DEMO, _write(files, tmp_path))
    assert series.shape == (1, 24, 24, 24, 8) and series.dtype == np.float32
    assert np.isfinite(series).all()
    std = series[0].std(axis=-1)
    brain = std > 0
    assert 0.1 < brain.mean() < 0.9  # background is zeroed, the head is not
    np.testing.assert_allclose(series[0][brain].mean(axis=-1), 0.0, atol=1e-4)
    np.testing.assert_allclose(std[brain], 1.0, atol=1e-3)
    assert (series[0][~brain] == 0).all()


@pytest.mark.parametrize("orientation", [("R", "A", "S"), ("L", "A", "S")])
@pytest.mark.parametrize("label", ["left", "right"])
def test_activation_side_survives_writing_and_loading(tmp_path: Path, orientation, label) -> None:
    for seed in range(3):
        files = make_bold_phantom(
            np.random.default_rng(seed), label, frames=16, orientation=orientation
        )
        assert nib.aff2axcodes(files[0].affine) == orientation
        series = DEMO.load(DEMO, _write(files, tmp_path, f"s{seed}"))[0]
        x = _activation_x(series)
        assert (x < 12) == (label == "left"), (seed, x)


def test_ignoring_the_affine_puts_a_las_activation_on_the_wrong_side(tmp_path: Path) -> None:
    files = make_bold_phantom(
        np.random.default_rng(0), "left", frames=8, orientation=("L", "A", "S")
    )
    raw = np.asarray(nib.load(_write(files, tmp_path)[0]).dataobj, dtype=np.float32)
    assert _activation_x(imaging.zscore_time(raw)) > raw.shape[0] / 2


@pytest.mark.parametrize("orientation", [("L", "P", "S"), ("P", "I", "R")])
def test_every_orientation_loads_to_the_same_input(tmp_path: Path, orientation) -> None:
    a = make_bold_phantom(np.random.default_rng(3), "left", frames=8, orientation=imaging.RAS)
    b = make_bold_phantom(np.random.default_rng(3), "left", frames=8, orientation=orientation)
    np.testing.assert_array_equal(
        DEMO.load(DEMO, _write(a, tmp_path, "a")), DEMO.load(DEMO, _write(b, tmp_path, "b"))
    )


def test_the_window_is_the_first_frames(tmp_path: Path) -> None:
    files = make_bold_phantom(np.random.default_rng(1), "right", frames=12, orientation=imaging.RAS)
    full = _write(files, tmp_path, "full")
    data = files[0].data
    head = _write([attr_replace(files[0], data[..., :8])], tmp_path, "head")
    tail = _write([attr_replace(files[0], data[..., 4:12])], tmp_path, "tail")
    np.testing.assert_array_equal(DEMO.load(DEMO, full), DEMO.load(DEMO, head))
    assert not np.array_equal(DEMO.load(DEMO, full), DEMO.load(DEMO, tail))


def attr_replace(file, data):
    import attrs

    return attrs.evolve(file, data=np.ascontiguousarray(data))


# ---------------------------------------------------------------------------
# Real series shipped with nibabel
# ---------------------------------------------------------------------------


def test_real_functional_series_loads_with_a_window_of_up_to_20_frames() -> None:
    spec = FMRI.with_geometry((16, 16, 8, 12), (8, 8, 4, 4))
    series = spec.load(spec, [FUNCTIONAL])
    assert series.shape == (1, 16, 16, 8, 12) and series.dtype == np.float32
    canonical = nib.as_closest_canonical(nib.load(FUNCTIONAL)).get_fdata()[..., :12]
    window = imaging.resize(canonical, (16, 16, 8))
    mean = window.mean(axis=-1)
    brain = mean >= BACKGROUND_FRACTION * np.percentile(mean, 98)
    expected = np.where(brain[..., None], imaging.zscore_time(window), 0.0)
    np.testing.assert_allclose(series[0], expected, atol=1e-4)
    assert brain.mean() > 0.5
    whole = FMRI.with_geometry((16, 16, 8, 20), (8, 8, 4, 4))
    assert whole.load(whole, FUNCTIONAL).shape == (1, 16, 16, 8, 20)


def test_real_series_is_flipped_to_ras() -> None:
    # functional.nii is LAS: at native size the output is the raw series mirrored on x.
    spec = FMRI.with_geometry((17, 21, 3, 20), (17, 21, 3, 4))
    raw = np.asarray(nib.load(FUNCTIONAL).dataobj, dtype=np.float32)[::-1]
    series = spec.load(spec, FUNCTIONAL)[0]
    z = imaging.zscore_time(raw)
    brain = series.std(axis=-1) > 0
    np.testing.assert_allclose(series[brain], z[brain], atol=1e-4)


def test_a_series_shorter_than_the_window_is_refused_naming_the_file() -> None:
    # example4d says TR 2000 s: max_tr lets it through, to reach its 2 frames.
    spec = plugin.configure(FMRI.with_geometry((32, 32, 16, 4), (8, 8, 8, 4)), {"max_tr": 3000})
    with pytest.raises(
        DataError, match=r"example4d.nii.gz: the series has 2 frames, fewer than the 4 frames"
    ):
        spec.load(spec, [EXAMPLE4D])
    short = plugin.configure(FMRI.with_geometry((32, 32, 16, 2), (8, 8, 8, 2)), {"max_tr": 3000})
    assert short.load(short, [EXAMPLE4D]).shape == (1, 32, 32, 16, 2)


# ---------------------------------------------------------------------------
# Repetition time: milliseconds labelled as seconds, bounded resampling (issue 12)
# ---------------------------------------------------------------------------

MS_AS_SECONDS = r"repetition time is 2000 s .*milliseconds labelled as seconds"


def test_example4d_tr_in_milliseconds_is_refused_from_the_header_alone() -> None:
    # nibabel's example4d: pixdim[4] 2000 with the unit "sec". Resampled to 2 s it
    # would become 1,001 frames of 128x96x24 (1.2 GB); refused before any voxel.
    slow = plugin.with_target_tr(DEMO, 2.0)
    for spec in (DEMO, slow):
        with pytest.raises(DataError, match=r"example4d.nii.gz: the header's " + MS_AS_SECONDS):
            spec.windows.frames(spec, (EXAMPLE4D,))
        with pytest.raises(DataError, match=MS_AS_SECONDS):
            spec.windows.series(spec, (EXAMPLE4D,))
        with pytest.raises(DataError, match=r"fix the header .* data.preprocessing.fmri.max_tr"):
            spec.load(spec, (EXAMPLE4D,))


def _series(path: Path, frames: int = 20, tr: float = 2.0, unit: str = "sec") -> str:
    data = np.random.default_rng(0).random((8, 8, 8, frames)).astype(np.float32) + 1.0
    img = nib.Nifti1Image(data, np.eye(4))
    img.header.set_zooms((2.0, 2.0, 2.0, tr))
    img.header.set_xyzt_units("mm", unit)
    nib.save(img, str(path))
    return str(path)


def test_a_tr_in_milliseconds_labelled_msec_is_read_as_seconds(tmp_path: Path) -> None:
    from umbrella_fmri.preprocess import repetition_time

    assert repetition_time(_series(tmp_path / "a_bold.nii.gz", tr=2000, unit="msec")) == 2.0


def test_a_sidecar_in_seconds_overrides_a_wrong_header_and_one_in_ms_is_refused(
    tmp_path: Path,
) -> None:
    import json

    path = _series(tmp_path / "sub-01_bold.nii.gz", tr=2000)
    sidecar = tmp_path / "sub-01_bold.json"
    sidecar.write_text(json.dumps({"RepetitionTime": 2.0}))
    assert DEMO.windows.frames(DEMO, (path,)) == 20  # the hint in the error works
    sidecar.write_text(json.dumps({"RepetitionTime": 2000}))
    with pytest.raises(DataError, match=r"sub-01_bold.json: RepetitionTime is 2000, over the 20 s"):
        DEMO.windows.frames(DEMO, (path,))
    sidecar.write_text("{not json")
    with pytest.raises(DataError, match=r"sub-01_bold.json: not a valid JSON sidecar"):
        DEMO.load(DEMO, (path,))


def test_max_tr_setting_raises_the_limit_and_is_checked() -> None:
    spec = plugin.configure(DEMO, {"max_tr": 2500})
    assert spec.windows.frames(spec, (EXAMPLE4D,)) == 2
    both = plugin.configure(DEMO, {"max_tr": 2500, "target_tr": 1000.0})
    assert both.windows.frames(both, (EXAMPLE4D,)) == 3  # 2000 s -> 1000 s
    with pytest.raises(ValueError, match="max_tr must be a positive number"):
        plugin.configure(DEMO, {"max_tr": 0})
    with pytest.raises(ValueError, match="unknown setting 'tr'; fmri takes: max_tr, target_tr"):
        plugin.configure(DEMO, {"tr": 2.0})


def test_resampling_that_would_grow_a_series_past_its_bound_is_refused(
    tmp_path: Path, monkeypatch
) -> None:
    from umbrella_fmri.preprocess import MAX_TIME_GROWTH

    path = _series(tmp_path / "sub-01_bold.nii.gz", frames=20, tr=2.0)
    fine = plugin.with_target_tr(DEMO, 2.0 / MAX_TIME_GROWTH)
    assert fine.windows.frames(fine, (path,)) == 19 * MAX_TIME_GROWTH + 1
    fast = plugin.with_target_tr(DEMO, 0.1)  # 2 s -> 0.1 s: 20 times the frames
    growth = r"sub-01_bold.nii.gz: resampling from TR 2 s to target_tr 0.1 s would turn 20 "
    with pytest.raises(DataError, match=growth + r"frames into 381, more than 8x"):
        fast.windows.frames(fast, (path,))
    with pytest.raises(DataError, match=growth):
        fast.windows.series(fast, (path,))
    # Within the growth bound, the voxel ceiling still holds for the resampled series.
    monkeypatch.setenv("UMBRELLA_MAX_VOXELS", str(8**3 * 100))
    with pytest.raises(DataError, match=r"would make 153 frames .* over the ceiling of 51,200"):
        fine.windows.frames(fine, (path,))


def test_a_3d_volume_is_refused_naming_the_file() -> None:
    with pytest.raises(DataError, match=r"anatomical.nii: expected a 4D series \(x, y, z, time\)"):
        DEMO.load(DEMO, [ANATOMICAL])


def test_more_than_one_file_is_refused() -> None:
    with pytest.raises(DataError, match="fmri takes one 4D file per image, got 2"):
        DEMO.load(DEMO, [FUNCTIONAL, FUNCTIONAL])


def test_cache_key_follows_the_json_sidecar(tmp_path: Path) -> None:
    # The sidecar's RepetitionTime decides a resampled series: editing it must miss the cache.
    import json

    from umbrella_core.data.cache import PreprocessedCache

    bold = str(tmp_path / "sub-01_task-rest_bold.nii.gz")
    imaging.save_nifti(bold, np.ones((4, 4, 4, 30), np.int16), np.eye(4), tr=2.0)
    cache = PreprocessedCache(tmp_path / "cache", {"fmri": "umbrella-fmri==test"})
    keys = [cache.key(DEMO, [bold], series=True)]
    sidecar = tmp_path / "sub-01_task-rest_bold.json"
    sidecar.write_text(json.dumps({"RepetitionTime": 2.0}))
    keys.append(cache.key(DEMO, [bold], series=True))
    os.utime(sidecar, ns=(0, 10**18))
    keys.append(cache.key(DEMO, [bold], series=True))
    assert plugin.companions(DEMO, [bold]) == [str(sidecar)]
    assert len(set(keys)) == 3
