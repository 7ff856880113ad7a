"""Tests of the diffusion MRI plugin: its spec and hooks, its loader on phantoms and real files."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.testing import data_path
from umbrella_dmri import plugin
from umbrella_dmri.phantom import make_dmri_phantom
from umbrella_dmri.plugin import DMRI
from umbrella_dmri.preprocess import FA_CENTRE, FA_SCALE, map_of

from umbrella_core import DataError, imaging
from umbrella_core.testing import embed_and_backpropagate, registered_hooks

ANATOMICAL = os.path.join(data_path, "anatomical.nii")
DEMO = DMRI.for_demo()


def _write(files, folder: Path, stem: str = "sub-01") -> list[str]:
    return [
        imaging.save_nifti(folder / f"{stem}_{f.suffix}.nii.gz", f.data, f.affine) for f in files
    ]


@pytest.fixture(scope="module")
def real_maps(tmp_path_factory) -> dict[str, str]:
    """FA and MD maps made from nibabel's real (LAS, big-endian int16) T1 volume.

    Two files, the same two maps as one 4D file, and the canonical arrays to compare with.
    """
    folder = tmp_path_factory.mktemp("real")
    img = nib.load(ANATOMICAL)
    t1 = np.asarray(img.dataobj, dtype=np.float32)
    brain = t1 > np.percentile(t1, 40)
    fa = np.where(brain, 0.9 * t1 / t1.max(), 0.0).astype(np.float32)
    md = np.where(brain, 3e-3 - 2.5e-3 * t1 / t1.max(), 0.0).astype(np.float32)
    paths = {
        "FA": imaging.save_nifti(folder / "sub-01_FA.nii.gz", fa, img.affine),
        "MD": imaging.save_nifti(folder / "sub-01_MD.nii.gz", md, img.affine),
        "stack": imaging.save_nifti(
            folder / "sub-01_dti.nii.gz", np.stack([fa, md], -1), img.affine
        ),
    }
    canonical = [
        nib.as_closest_canonical(nib.Nifti1Image(m, img.affine)).get_fdata() for m in (fa, md)
    ]
    return {**paths, "canonical": canonical}


# ---------------------------------------------------------------------------
# Spec and hooks
# ---------------------------------------------------------------------------


def test_spec_metadata() -> None:
    assert DMRI.name == "dmri" and DMRI.ndim == 3 and DMRI.channels == 2
    assert set(DMRI.aliases) == {"dwi", "dti", "diffusion"}
    assert DMRI.shape == (96, 96, 96) and DMRI.num_tokens == 216
    assert DEMO.shape == (32, 32, 32) and DEMO.num_tokens == 64
    assert {"*_FA.nii.gz", "*_MD.nii.gz"} <= set(DMRI.file_patterns)
    assert DMRI.demo.labels == ("left", "right")
    assert DMRI.demo.question == "Which hemisphere holds the lesion?"


def test_passes_the_plugin_conformance_checks(umbrella_conformance) -> None:
    # Entry point, hooks, names and patterns, light import, embedder token count and
    # dispatch by name (same shape, other name: None), and the lesion side surviving
    # save_nifti + load of both maps.
    assert umbrella_conformance.modality_plugin(plugin, entry_point="dmri") == [DEMO]


@pytest.mark.parametrize(
    "shape, patch, tokens", [((32, 32, 32), (8, 8, 8), 64), ((48, 48, 32), (16, 16, 16), 18)]
)
def test_patch_embedder_takes_both_maps_as_channels(shape, patch, tokens) -> None:
    import torch

    spec = DMRI.with_geometry(shape, patch)
    assert spec.num_tokens == tokens
    # The plugin gives no embedder of its own: the core's default serves it.
    module, x, _ = embed_and_backpropagate(registered_hooks(plugin), spec, hidden_size=16)
    assert x.shape == (2, 2, *shape)
    assert x.grad[:, 1].abs().sum() > 0  # the MD channel is used
    with pytest.raises(ValueError, match="expected input"):
        module(torch.randn(2, 1, *shape))


# ---------------------------------------------------------------------------
# Phantom written to disk, then loaded
# ---------------------------------------------------------------------------


def test_phantom_loads_as_two_normalised_channels(tmp_path: Path) -> None:
    files = DEMO.demo.phantom(DEMO, np.random.default_rng(0), "left")
    assert [f.suffix for f in files] == ["FA", "MD"]
    fa_raw, md_raw = (f.data for f in files)
    assert 0.0 <= fa_raw.min() and fa_raw.max() <= 1.0 and 1e-4 < md_raw.max() < 4e-3
    maps = DEMO.load(DEMO, _write(files, tmp_path))
    assert maps.shape == (2, 32, 32, 32) and maps.dtype == np.float32 and np.isfinite(maps).all()
    brain = maps[1] != 0
    assert 0.1 < brain.mean() < 0.7
    assert (maps[:, ~brain] == 0).all()  # the background is exactly 0 in both channels
    assert abs(float(maps[1][brain].mean())) < 1e-4  # MD: z-scored in the brain
    assert float(maps[1][brain].std()) == pytest.approx(1.0, abs=1e-3)
    fa = maps[0][brain] * FA_SCALE + FA_CENTRE  # FA: a fixed map, so absolute FA comes back
    assert 0.0 <= fa.min() and fa.max() <= 1.0 + 1e-6


@pytest.mark.parametrize("orientation", [("R", "A", "S"), ("L", "A", "S")])
def test_lesion_side_survives_writing_and_loading(tmp_path: Path, orientation) -> None:
    # The same seed with the other label mirrors the tumour's place: the difference
    # of the two loaded MD maps is positive where the left tumour is.
    for seed in range(3):
        left = make_dmri_phantom(np.random.default_rng(seed), "left", orientation=orientation)
        right = make_dmri_phantom(np.random.default_rng(seed), "right", orientation=orientation)
        assert nib.aff2axcodes(left[0].affine) == orientation
        a = DEMO.load(DEMO, _write(left, tmp_path, f"l{seed}"))
        b = DEMO.load(DEMO, _write(right, tmp_path, f"r{seed}"))
        md = a[1] - b[1]
        fa = a[0] - b[0]
        assert md[:16].sum() > 0 > md[16:].sum(), seed  # higher MD on the left
        assert fa[:16].sum() < 0 < fa[16:].sum(), seed  # lower FA on the left


@pytest.mark.parametrize("orientation", [("L", "P", "S"), ("P", "I", "R")])
def test_every_orientation_loads_to_the_same_input(tmp_path: Path, orientation) -> None:
    a = make_dmri_phantom(np.random.default_rng(5), "right", orientation=imaging.RAS)
    b = make_dmri_phantom(np.random.default_rng(5), "right", orientation=orientation)
    # Equal up to float rounding: statistics are summed in each file's memory order.
    np.testing.assert_allclose(
        DEMO.load(DEMO, _write(a, tmp_path, "a")),
        DEMO.load(DEMO, _write(b, tmp_path, "b")),
        rtol=1e-5,
        atol=1e-5,
    )


# ---------------------------------------------------------------------------
# The two file forms, on maps made from a real volume
# ---------------------------------------------------------------------------


def test_two_files_and_one_4d_file_give_the_same_input(real_maps) -> None:
    spec = DMRI.with_geometry((32, 40, 24), (8, 8, 8))
    separate = spec.load(spec, [real_maps["FA"], real_maps["MD"]])
    stacked = spec.load(spec, [real_maps["stack"]])
    assert separate.shape == (2, 32, 40, 24)
    np.testing.assert_array_equal(separate, stacked)
    np.testing.assert_array_equal(spec.load(spec, real_maps["stack"]), stacked)


def test_real_maps_are_reoriented_like_nibabel(real_maps) -> None:
    spec = DMRI.with_geometry((33, 41, 25), (3, 41, 25))  # native size: no resampling
    maps = spec.load(spec, [real_maps["FA"], real_maps["MD"]])
    fa, md = real_maps["canonical"]
    brain = (fa != 0) | (md != 0)
    np.testing.assert_array_equal(maps[0] != 0, brain)
    np.testing.assert_allclose(maps[0][brain], (fa[brain] - FA_CENTRE) / FA_SCALE, atol=1e-4)
    expected_md = imaging.zscore_masked(imaging.robust_normalise(md), brain)
    np.testing.assert_allclose(maps[1], expected_md, atol=1e-4)
    assert not np.allclose(maps[1], expected_md[::-1], atol=1e-2)  # the x flip mattered


def test_file_order_does_not_matter_when_names_say_which_map(real_maps) -> None:
    spec = DMRI.with_geometry((16, 16, 16), (8, 8, 8))
    np.testing.assert_array_equal(
        spec.load(spec, [real_maps["MD"], real_maps["FA"]]),
        spec.load(spec, [real_maps["FA"], real_maps["MD"]]),
    )


@pytest.mark.parametrize(
    "name, expected",
    [
        ("sub-01_FA.nii.gz", "FA"),
        ("dti_MD.nii.gz", "MD"),
        ("sub-01_desc-FA_dwimap.nii.gz", "FA"),
        ("sub-01_dwi.nii.gz", None),
        ("sub-fa_MD.nii.gz", None),
    ],
)
def test_map_names(name: str, expected) -> None:
    assert map_of(name) == expected


def test_wrong_file_count_is_refused_naming_the_files(real_maps) -> None:
    three = [real_maps["FA"], real_maps["MD"], real_maps["FA"]]
    with pytest.raises(
        DataError,
        match=r"dmri takes 2 3D files \(FA, MD\) or one 4D file.*got 3 files: .*sub-01_FA.nii.gz",
    ):
        DEMO.load(DEMO, three)


def test_one_3d_file_is_refused_naming_it(real_maps) -> None:
    with pytest.raises(
        DataError, match=r"sub-01_FA.nii.gz: expected 2 maps \(FA, MD\) stacked on the 4th axis"
    ):
        DEMO.load(DEMO, [real_maps["FA"]])


def test_4d_file_with_the_wrong_volume_count_is_refused_naming_it(tmp_path: Path) -> None:
    path = imaging.save_nifti(
        tmp_path / "sub-02_dti.nii.gz", np.ones((8, 8, 8, 3), np.float32) * 0.5, np.eye(4)
    )
    with pytest.raises(
        DataError, match=r"sub-02_dti.nii.gz: expected 2 maps .* shape \(8, 8, 8, 3\)"
    ):
        DEMO.load(DEMO, [path])


def test_a_4d_file_where_a_3d_map_belongs_is_refused(tmp_path: Path, real_maps) -> None:
    path = imaging.save_nifti(
        tmp_path / "x_MD.nii.gz", np.ones((33, 41, 25, 2), np.float32), np.eye(4)
    )
    with pytest.raises(DataError, match=r"x_MD.nii.gz: expected a 3D MD map"):
        DEMO.load(DEMO, [real_maps["FA"], path])


def test_maps_on_different_grids_are_refused(tmp_path: Path, real_maps) -> None:
    path = imaging.save_nifti(
        tmp_path / "sub-01_MD.nii.gz", np.ones((20, 20, 20), np.float32), np.eye(4)
    )
    with pytest.raises(
        DataError,
        match=r"sub-01_MD.nii.gz: the MD map has shape \(20, 20, 20\) but .*sub-01_FA.nii.gz",
    ):
        DEMO.load(DEMO, [real_maps["FA"], path])


def test_two_files_naming_the_same_map_are_refused(real_maps) -> None:
    with pytest.raises(DataError, match="announce the maps FA, FA"):
        DEMO.load(DEMO, [real_maps["FA"], real_maps["FA"]])


def test_scaled_fa_is_refused(tmp_path: Path, real_maps) -> None:
    img = nib.load(real_maps["FA"])
    path = imaging.save_nifti(
        tmp_path / "big_FA.nii.gz", np.asarray(img.dataobj) * 1000, img.affine
    )
    with pytest.raises(DataError, match=r"big_FA.nii.gz: FA values reach .* FA lies in \[0, 1\]"):
        DEMO.load(DEMO, [path, real_maps["MD"]])


def test_a_raw_dwi_series_is_told_to_be_dmri_by_its_bids_name():
    from umbrella_core.inference.generate import guess_modality
    from umbrella_core.plugins import get_plugin_manager

    specs = {name: p.item for name, p in get_plugin_manager().modality_registry().items()}
    assert guess_modality("/data/sub-01/dwi/sub-01_dwi.nii.gz", specs) == "dmri"
    assert guess_modality("sub-01_FA.nii.gz", specs) == "dmri"
