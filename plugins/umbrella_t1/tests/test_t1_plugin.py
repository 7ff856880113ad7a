"""Tests of the T1 plugin: its spec and hooks, its loader on phantoms and real files."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pluggy
import pytest
from nibabel.testing import data_path
from umbrella_t1 import plugin
from umbrella_t1.phantom import make_t1_phantom
from umbrella_t1.plugin import T1
from umbrella_t1.preprocess import FOREGROUND_THRESHOLD, LOWER_PERCENTILE, UPPER_PERCENTILE

from umbrella_core import DataError, ModalitySpec, hookspecs, imaging

ANATOMICAL = os.path.join(data_path, "anatomical.nii")
FUNCTIONAL = os.path.join(data_path, "functional.nii")
DEMO = T1.for_demo()


def _write(files, folder: Path, stem: str = "sub-01") -> list[str]:
    return [
        imaging.save_nifti(folder / f"{stem}_{f.suffix}.nii.gz", f.data, f.affine) for f in files
    ]


def _expected(raw: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The documented pipeline, written out: resize, clip to percentiles, z-score the head."""
    unit = imaging.robust_normalise(imaging.resize(raw, shape), LOWER_PERCENTILE, UPPER_PERCENTILE)
    head = unit > FOREGROUND_THRESHOLD
    return np.where(head, (unit - unit[head].mean()) / unit[head].std(), 0.0)


def _lesion_x(volume: np.ndarray, size: int = 3) -> int:
    """x index of the brightest ``size``-cube of voxels: the enhancing core, not a hot voxel."""
    padded = np.pad(volume.astype(np.float64), size // 2, mode="edge")
    smooth = np.zeros(volume.shape)
    for dx in range(size):
        for dy in range(size):
            for dz in range(size):
                smooth += padded[
                    dx : dx + volume.shape[0], dy : dy + volume.shape[1], dz : dz + volume.shape[2]
                ]
    return int(np.unravel_index(np.argmax(smooth), volume.shape)[0])


# ---------------------------------------------------------------------------
# Spec and hooks
# ---------------------------------------------------------------------------


def test_spec_metadata() -> None:
    assert T1.name == "t1" and T1.ndim == 3 and T1.channels == 1
    assert set(T1.aliases) == {"t1w", "smri", "anat"}
    assert T1.shape == (128, 128, 128) and T1.num_tokens == 512
    assert DEMO.shape == (32, 32, 32) and DEMO.num_tokens == 64
    assert "*_T1w.nii.gz" in T1.file_patterns and "*_T1w.nii" in T1.file_patterns
    assert T1.phantom_labels == ("left", "right")
    assert T1.phantom_question == "Which hemisphere holds the lesion?"


def test_entry_point_is_installed() -> None:
    points = importlib.metadata.entry_points(group="umbrella")
    assert any(p.name == "t1" and p.value == "umbrella_t1.plugin" for p in points)


def test_hooks_match_the_hookspecs() -> None:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(plugin)
    pm.check_pending()  # every umbrella_* function is a known hook with known arguments
    assert pm.hook.umbrella_modalities() == [[T1]]
    module = pm.hook.umbrella_patch_embedder(spec=DEMO, hidden_size=8)
    assert module is not None


def test_patch_embedder_ignores_other_modalities() -> None:
    other = ModalitySpec(name="dmri", ndim=3, shape=(8, 8, 8), patch_size=(4, 4, 4), load=len)
    assert plugin.umbrella_patch_embedder(other, 16) is None


@pytest.mark.parametrize(
    "shape, patch, tokens", [((32, 32, 32), (8, 8, 8), 64), ((16, 24, 16), (8, 8, 8), 12)]
)
def test_patch_embedder_follows_the_configured_geometry(shape, patch, tokens) -> None:
    import torch

    spec = T1.with_geometry(shape, patch)
    module = plugin.umbrella_patch_embedder(spec, 16)
    x = torch.randn(2, *spec.input_shape, requires_grad=True)
    out = module(x)
    assert out.shape == (2, tokens, 16) == (2, spec.num_tokens, 16)
    out.sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in module.parameters())


def test_importing_the_plugin_does_not_import_torch_or_nibabel() -> None:
    code = (
        "import sys, umbrella_t1.plugin as p; p.umbrella_modalities(); "
        "print(sorted(m for m in ('torch', 'nibabel') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------------------
# Phantom written to disk, then loaded
# ---------------------------------------------------------------------------


def test_phantom_loads_to_the_documented_range(tmp_path: Path) -> None:
    files = DEMO.phantom(DEMO, np.random.default_rng(0), "left")
    assert [f.suffix for f in files] == ["T1w"] and files[0].data.dtype == np.int16
    paths = _write(files, tmp_path)
    assert nib.load(paths[0]).get_data_dtype() == np.int16
    volume = DEMO.load(DEMO, paths)
    assert volume.shape == (1, 32, 32, 32) and volume.dtype == np.float32
    assert np.isfinite(volume).all()
    head = volume != 0
    assert 0.2 < head.mean() < 0.8  # the background around the head is exactly 0
    assert abs(float(volume[head].mean())) < 1e-4 and float(volume[head].std()) == pytest.approx(
        1.0, abs=1e-3
    )
    assert -4.0 < volume.min() and volume.max() < 4.0


@pytest.mark.parametrize("orientation", [("R", "A", "S"), ("L", "A", "S")])
@pytest.mark.parametrize("label", ["left", "right"])
def test_lesion_side_survives_writing_and_loading(tmp_path: Path, orientation, label) -> None:
    for seed in range(4):
        files = make_t1_phantom(np.random.default_rng(seed), label, orientation=orientation)
        assert nib.aff2axcodes(files[0].affine) == orientation
        volume = DEMO.load(DEMO, _write(files, tmp_path, f"s{seed}"))[0]
        # RAS: the first axis runs to the Right, so the left hemisphere is at low x.
        x = _lesion_x(volume)
        assert (x < 16) == (label == "left"), (seed, x)


def test_ignoring_the_affine_puts_a_las_lesion_on_the_wrong_side(tmp_path: Path) -> None:
    # The check above can fail: raw LAS voxels put the left lesion at high x.
    files = make_t1_phantom(np.random.default_rng(0), "left", orientation=("L", "A", "S"))
    raw = np.asarray(nib.load(_write(files, tmp_path)[0]).dataobj, dtype=np.float32)
    assert _lesion_x(raw, size=5) > raw.shape[0] / 2


@pytest.mark.parametrize("orientation", imaging.PHANTOM_ORIENTATIONS[1:])
def test_every_orientation_loads_to_the_same_input(tmp_path: Path, orientation) -> None:
    ras = make_t1_phantom(np.random.default_rng(4), "right", orientation=imaging.RAS)
    other = make_t1_phantom(np.random.default_rng(4), "right", orientation=orientation)
    assert other[0].data.shape == imaging.reorient(ras[0].data, ras[0].affine, orientation)[0].shape
    a = DEMO.load(DEMO, _write(ras, tmp_path, "ras"))
    b = DEMO.load(DEMO, _write(other, tmp_path, "other"))
    np.testing.assert_array_equal(a, b)


def test_phantom_is_deterministic_and_orientation_is_random() -> None:
    a = DEMO.phantom(DEMO, np.random.default_rng(11), "left")[0]
    b = DEMO.phantom(DEMO, np.random.default_rng(11), "left")[0]
    np.testing.assert_array_equal(a.data, b.data)
    rng = np.random.default_rng(0)
    codes = {nib.aff2axcodes(DEMO.phantom(DEMO, rng, "left")[0].affine) for _ in range(12)}
    assert len(codes) >= 3 and ("R", "A", "S") in codes


# ---------------------------------------------------------------------------
# Real files shipped with nibabel
# ---------------------------------------------------------------------------


def test_real_anatomical_loads_to_the_configured_shape() -> None:
    spec = T1.with_geometry((32, 40, 24), (8, 8, 8))
    volume = spec.load(spec, [ANATOMICAL])
    assert volume.shape == (1, 32, 40, 24) and volume.dtype == np.float32
    canonical = nib.as_closest_canonical(nib.load(ANATOMICAL)).get_fdata()
    np.testing.assert_allclose(volume[0], _expected(canonical, (32, 40, 24)), atol=1e-4)


def test_real_anatomical_is_flipped_to_ras() -> None:
    # anatomical.nii is LAS: at the native size the loader's output is the raw data mirrored on x.
    raw = np.asarray(nib.load(ANATOMICAL).dataobj, dtype=np.float32)
    spec = T1.with_geometry((33, 41, 25), (3, 41, 25))
    volume = spec.load(spec, ANATOMICAL)[0]
    np.testing.assert_allclose(volume, _expected(raw[::-1], raw.shape), atol=1e-4)
    assert not np.allclose(volume, _expected(raw, raw.shape), atol=1e-2)


def test_singleton_fourth_axis_is_accepted(tmp_path: Path) -> None:
    img = nib.load(ANATOMICAL)
    path = imaging.save_nifti(
        tmp_path / "x_T1w.nii.gz", np.asarray(img.dataobj)[..., None], img.affine
    )
    spec = T1.with_geometry((16, 16, 16), (8, 8, 8))
    np.testing.assert_array_equal(spec.load(spec, [path]), spec.load(spec, [ANATOMICAL]))


def test_a_series_is_refused_naming_the_file() -> None:
    with pytest.raises(
        DataError, match=r"functional.nii: expected one 3D T1-weighted volume.*20 volumes"
    ):
        DEMO.load(DEMO, [FUNCTIONAL])


def test_more_than_one_file_is_refused() -> None:
    with pytest.raises(DataError, match="t1 takes one file per image, got 2: .*anatomical.nii"):
        DEMO.load(DEMO, [ANATOMICAL, ANATOMICAL])


def test_unreadable_file_error_names_it(tmp_path: Path) -> None:
    path = tmp_path / "sub-07_T1w.nii.gz"
    path.write_bytes(b"\x1f\x8b truncated")
    with pytest.raises(DataError, match="sub-07_T1w.nii.gz"):
        DEMO.load(DEMO, [path])
