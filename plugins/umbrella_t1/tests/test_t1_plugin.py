"""Tests of the T1 plugin: its spec and hooks, its loader on phantoms and real files."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.testing import data_path
from umbrella_t1 import plugin
from umbrella_t1.phantom import T1_CONTRAST, make_t1_phantom
from umbrella_t1.plugin import T1
from umbrella_t1.preprocess import find_brain_mask, load_t1, output_spacing, t1_loader

from umbrella_core import DataError, ModalitySpec, imaging
from umbrella_core.testing import check_patch_embedder

ANATOMICAL = os.path.join(data_path, "anatomical.nii")
FUNCTIONAL = os.path.join(data_path, "functional.nii")
DEMO = T1.for_demo()


def _write(files, folder: Path, stem: str = "sub-01") -> list[str]:
    return [
        imaging.save_nifti(folder / f"{stem}_{f.suffix}.nii.gz", f.data, f.affine) for f in files
    ]


def _extent(volume: np.ndarray) -> list[tuple[int, int]]:
    """First and last index of the nonzero voxels along each axis."""
    out = []
    for axis in range(volume.ndim):
        others = tuple(a for a in range(volume.ndim) if a != axis)
        found = np.flatnonzero(np.any(volume != 0, axis=others))
        out.append((int(found[0]), int(found[-1])))
    return out


def _best_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Correlation of ``a`` and ``b`` at the best shift of up to one voxel per axis."""
    inner = (slice(2, -2),) * 3
    return max(
        float(np.corrcoef(a[inner].ravel(), np.roll(b, (i, j, k), (0, 1, 2))[inner].ravel())[0, 1])
        for i in (-1, 0, 1)
        for j in (-1, 0, 1)
        for k in (-1, 0, 1)
    )


def _clean_head(folder: Path, name: str, shape, voxel: float, seed: int = 3) -> tuple[str, object]:
    """A noise-free phantom head (the same anatomy in world mm whatever the grid), written."""
    head = imaging.head_phantom(np.random.default_rng(seed), shape, (voxel,) * 3, position_jitter=0)
    data = np.rint(head.image(T1_CONTRAST) * 1000).astype(np.int16)
    return imaging.save_nifti(folder / f"{name}_T1w.nii.gz", data, head.affine), head


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
    assert T1.demo.labels == ("left", "right")
    assert T1.demo.question == "Which hemisphere holds the lesion?"


def test_passes_the_plugin_conformance_checks(umbrella_conformance) -> None:
    # Entry point, hooks, names and patterns, light import, embedder token count and
    # dispatch by name, and the phantom's label surviving save_nifti + load.
    assert umbrella_conformance.modality_plugin(plugin, entry_point="t1") == [DEMO]


@pytest.mark.parametrize(
    "shape, patch, tokens", [((32, 32, 32), (8, 8, 8), 64), ((16, 24, 16), (8, 8, 8), 12)]
)
def test_patch_embedder_follows_the_configured_geometry(shape, patch, tokens) -> None:
    spec = T1.with_geometry(shape, patch)
    module = check_patch_embedder(plugin, spec, hidden_size=16)
    assert spec.num_tokens == tokens and module is not None


# ---------------------------------------------------------------------------
# Phantom written to disk, then loaded
# ---------------------------------------------------------------------------


def test_phantom_loads_to_the_documented_range(tmp_path: Path) -> None:
    files = DEMO.demo.phantom(DEMO, np.random.default_rng(0), "left")
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
    a = DEMO.demo.phantom(DEMO, np.random.default_rng(11), "left")[0]
    b = DEMO.demo.phantom(DEMO, np.random.default_rng(11), "left")[0]
    np.testing.assert_array_equal(a.data, b.data)
    rng = np.random.default_rng(0)
    codes = {nib.aff2axcodes(DEMO.demo.phantom(DEMO, rng, "left")[0].affine) for _ in range(12)}
    assert len(codes) >= 3 and ("R", "A", "S") in codes


# ---------------------------------------------------------------------------
# Spacing, centring and padding
# ---------------------------------------------------------------------------


def test_output_spacing_rule() -> None:
    # The target spacing when the head fits, else just enough for its longest side.
    assert output_spacing((150.0, 180.0, 160.0), (128, 128, 128), 1.5) == 1.5
    assert output_spacing((150.0, 192.0, 160.0), (32, 32, 32), 1.5) == pytest.approx(6.0)
    assert output_spacing((100.0, 100.0, 50.0), (64, 64, 16), 1.0) == pytest.approx(3.125)


def test_spacing_is_honoured_whatever_the_voxel_size(tmp_path: Path) -> None:
    # The same head at 1 mm and at 2 mm, resampled to 2 mm, gives nearly the same input.
    fine, _ = _clean_head(tmp_path, "fine", (120, 140, 120), 1.0)
    coarse, _ = _clean_head(tmp_path, "coarse", (60, 70, 60), 2.0)
    spec = T1.with_geometry((64, 72, 64), (8, 8, 8))
    a = load_t1(spec, fine, spacing=2.0)[0]
    b = load_t1(spec, coarse, spacing=2.0)[0]
    # The head (about 102 x 119 x 102 mm) spans the same number of 2 mm voxels.
    for (a0, a1), (b0, b1) in zip(_extent(a), _extent(b), strict=True):
        assert abs((a1 - a0) - (b1 - b0)) <= 1
        assert 48 <= a1 - a0 <= 62
    # The placement can differ by one voxel (the centre is found from the data).
    assert (
        _best_correlation(a, b) > 0.93
    )  # the rest: half-voxel phase and partial volume at the folds
    # Ignoring the voxel size (the whole field of view to the shape, as before) would not be.
    assert abs(_extent(load_t1(spec, fine, spacing=1.0)[0])[0][1] - _extent(a)[0][1]) > 5


def test_configured_spacing_through_a_loader(tmp_path: Path) -> None:
    path, _ = _clean_head(tmp_path, "x", (60, 70, 60), 2.0)
    spec = T1.with_geometry((64, 64, 64), (8, 8, 8))
    custom = ModalitySpec(**{**_fields(spec), "load": t1_loader(3.0)})
    np.testing.assert_array_equal(custom.load(custom, [path]), load_t1(spec, path, spacing=3.0))
    with pytest.raises(ValueError, match="spacing must be positive"):
        t1_loader(0)


def _fields(spec: ModalitySpec) -> dict:
    import attrs

    return attrs.asdict(spec, recurse=False)


def test_off_centre_head_is_not_cropped_away(tmp_path: Path) -> None:
    # A head in one corner of a large, empty field of view: centring on the
    # array would cut it; centring on the head gives the same input as alone.
    files = make_t1_phantom(np.random.default_rng(2), "right", orientation=imaging.RAS)
    alone = _write(files, tmp_path, "alone")[0]
    big = np.zeros((120, 140, 120), dtype=np.int16)
    big[-48:, :56, -48:] = files[0].data
    affine = files[0].affine.copy()
    affine[:3, 3] -= affine[:3, :3] @ np.array([72.0, 0.0, 72.0])
    corner = imaging.save_nifti(tmp_path / "corner_T1w.nii.gz", big, affine)
    a = DEMO.load(DEMO, [alone])[0]
    b = DEMO.load(DEMO, [corner])[0]
    assert np.count_nonzero(b) == pytest.approx(np.count_nonzero(a), rel=0.05)
    # The resampling grid follows the source grid: up to a voxel of placement differs.
    assert _best_correlation(a, b) > 0.93
    assert _lesion_x(b) >= 16  # still the right hemisphere


def test_small_head_is_zero_padded(tmp_path: Path) -> None:
    # A 168 x 196 x 168 mm field of view at 3.5 mm in a 64^3 grid (224 mm): padding all round.
    files = make_t1_phantom(np.random.default_rng(0), "left", orientation=("L", "P", "S"))
    spec = T1.with_geometry((64, 64, 64), (8, 8, 8))
    volume = load_t1(spec, _write(files, tmp_path), spacing=3.5)[0]
    assert volume.shape == (64, 64, 64)
    for (lo, hi), size in zip(_extent(volume), (48, 56, 48), strict=True):
        assert lo >= 1 and hi <= 62  # the border is padding, exactly 0
        assert (hi - lo) <= size
    assert np.all(volume[0] == 0) and np.all(volume[-1] == 0)
    assert np.all(volume[:, 0] == 0) and np.all(volume[:, -1] == 0)


# ---------------------------------------------------------------------------
# Brain masks
# ---------------------------------------------------------------------------


def _head_and_mask(folder: Path, mask_name: str | None = "sub-01_desc-brain_mask"):
    path, head = _clean_head(folder, "sub-01", (48, 56, 48), 3.5)
    mask = (head.brain > 0.5).astype(np.uint8)
    mask_path = None
    if mask_name is not None:
        mask_path = imaging.save_nifti(folder / f"{mask_name}.nii.gz", mask, head.affine)
    return path, mask_path, head


def test_mask_given_as_second_path_is_applied(tmp_path: Path) -> None:
    path, mask_path, _ = _head_and_mask(tmp_path, "brain")
    spec = T1.with_geometry((48, 48, 48), (8, 8, 8))  # the brain fits at 3.5 mm
    masked = load_t1(spec, [path, mask_path], spacing=3.5)[0]
    whole = load_t1(spec, [path], spacing=3.5)[0]
    inside = masked != 0
    # The scalp and CSF are gone; the statistics are those of the brain.
    assert 0.3 * np.count_nonzero(whole) < np.count_nonzero(masked) < np.count_nonzero(whole)
    assert abs(float(masked[inside].mean())) < 1e-4
    assert float(masked[inside].std()) == pytest.approx(1.0, abs=1e-3)
    # At the native spacing the input is nonzero exactly on the mask's voxels.
    mask, _ = imaging.load_nifti(mask_path)
    assert np.count_nonzero(masked) == pytest.approx(np.count_nonzero(mask), rel=0.02)


@pytest.mark.parametrize(
    "mask_name", ["sub-01_desc-brain_mask", "sub-01_brainmask", "sub-01_T1w_mask"]
)
def test_mask_next_to_the_t1_is_found(tmp_path: Path, mask_name: str) -> None:
    path, mask_path, _ = _head_and_mask(tmp_path, mask_name)
    assert find_brain_mask(path) == mask_path
    spec = T1.with_geometry((32, 32, 32), (8, 8, 8))
    np.testing.assert_array_equal(spec.load(spec, [path]), spec.load(spec, [path, mask_path]))


def test_no_mask_next_to_the_t1_means_none() -> None:
    assert find_brain_mask("/nowhere/sub-01_T1w.nii.gz") is None
    folder = Path(data_path)
    assert find_brain_mask(folder / "anatomical.nii") is None


def test_find_brain_mask_drops_desc_entity(tmp_path: Path) -> None:
    t1 = tmp_path / "sub-01_ses-1_desc-preproc_T1w.nii.gz"
    mask = tmp_path / "sub-01_ses-1_desc-brain_mask.nii.gz"
    t1.write_bytes(b"")
    mask.write_bytes(b"")
    assert find_brain_mask(t1) == str(mask)


def test_mask_in_another_orientation_of_the_same_grid_is_accepted(tmp_path: Path) -> None:
    path, mask_path, head = _head_and_mask(tmp_path, "brain")
    mask = (head.brain > 0.5).astype(np.uint8)
    las, las_affine = imaging.reorient(mask, head.affine, ("L", "A", "S"))
    other = imaging.save_nifti(tmp_path / "las.nii.gz", np.ascontiguousarray(las), las_affine)
    spec = T1.with_geometry((32, 32, 32), (8, 8, 8))
    np.testing.assert_array_equal(
        spec.load(spec, [path, other]), spec.load(spec, [path, mask_path])
    )


def test_mask_on_another_grid_is_refused_naming_both_files(tmp_path: Path) -> None:
    path, _, head = _head_and_mask(tmp_path, None)
    small = imaging.save_nifti(
        tmp_path / "small_mask.nii.gz", np.ones((24, 28, 24), np.uint8), head.affine
    )
    with pytest.raises(
        DataError, match=r"small_mask.nii.gz: .*another voxel grid than .*sub-01_T1w.nii.gz"
    ):
        DEMO.load(DEMO, [path, small])
    moved = head.affine.copy()
    moved[0, 3] += 7.0
    shifted = imaging.save_nifti(
        tmp_path / "moved_mask.nii.gz", np.ones(head.shape, np.uint8), moved
    )
    with pytest.raises(DataError, match=r"moved_mask.nii.gz: .*sub-01_T1w.nii.gz"):
        DEMO.load(DEMO, [path, shifted])


def test_empty_mask_is_refused(tmp_path: Path) -> None:
    path, _, head = _head_and_mask(tmp_path, None)
    empty = imaging.save_nifti(
        tmp_path / "empty.nii.gz", np.zeros(head.shape, np.uint8), head.affine
    )
    with pytest.raises(DataError, match="empty.nii.gz: the brain mask is empty"):
        DEMO.load(DEMO, [path, empty])


# ---------------------------------------------------------------------------
# Real files shipped with nibabel
# ---------------------------------------------------------------------------


def test_real_anatomical_loads_to_the_configured_shape() -> None:
    spec = T1.with_geometry((32, 40, 24), (8, 8, 8))
    volume = spec.load(spec, [ANATOMICAL])
    assert volume.shape == (1, 32, 40, 24) and volume.dtype == np.float32
    head = volume != 0
    assert 0.3 < head.mean() and abs(float(volume[head].mean())) < 1e-4
    assert float(volume[head].std()) == pytest.approx(1.0, abs=1e-3)


def test_real_anatomical_is_flipped_to_ras(tmp_path: Path) -> None:
    # anatomical.nii is LAS (2 mm): the loader must give what the RAS copy of it gives,
    # and not what the raw voxels with a RAS affine (the affine ignored) give.
    img = nib.load(ANATOMICAL)
    canonical = nib.as_closest_canonical(img)
    assert nib.aff2axcodes(canonical.affine) == ("R", "A", "S")
    ras = imaging.save_nifti(
        tmp_path / "ras_T1w.nii.gz", np.asarray(canonical.dataobj), canonical.affine
    )
    ignored = np.abs(img.affine)
    ignored[:3, 3] = img.affine[:3, 3]
    naive = imaging.save_nifti(tmp_path / "naive_T1w.nii.gz", np.asarray(img.dataobj), ignored)
    spec = T1.with_geometry((32, 40, 24), (8, 8, 8))
    volume = spec.load(spec, ANATOMICAL)
    np.testing.assert_array_equal(volume, spec.load(spec, ras))
    mirrored = spec.load(spec, naive)
    assert not np.allclose(volume, mirrored, atol=0.1)
    assert np.corrcoef(volume[0].ravel(), mirrored[0, ::-1].ravel())[0, 1] > 0.8


def test_real_anatomical_keeps_its_2mm_spacing() -> None:
    # At spacing 2 mm and its own shape, the 66 x 82 x 50 mm head is not resized.
    raw, _ = imaging.load_nifti(ANATOMICAL)
    spec = T1.with_geometry((33, 41, 25), (3, 41, 25))
    volume = load_t1(spec, ANATOMICAL, spacing=2.0)[0]
    head = volume != 0
    assert head.mean() > 0.3
    # Resampling at the native spacing is the identity: the nonzero voxels are the raw
    # voxels, possibly moved by whole voxels to centre the head.
    raw_head = raw > np.percentile(raw[raw != 0], 0.5) + 0.1 * np.ptp(raw)
    assert abs(int(head.sum()) - int(raw_head.sum())) < 0.05 * raw_head.sum()


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


def test_more_than_two_files_are_refused() -> None:
    with pytest.raises(DataError, match="t1 takes one file per image.*got 3: .*anatomical.nii"):
        DEMO.load(DEMO, [ANATOMICAL, ANATOMICAL, ANATOMICAL])


def test_unreadable_file_error_names_it(tmp_path: Path) -> None:
    path = tmp_path / "sub-07_T1w.nii.gz"
    path.write_bytes(b"\x1f\x8b truncated")
    with pytest.raises(DataError, match="sub-07_T1w.nii.gz"):
        DEMO.load(DEMO, [path])


def test_cache_sees_a_brain_mask_added_next_to_a_cached_t1(tmp_path: Path) -> None:
    from umbrella_core.data.cache import PreprocessedCache
    from umbrella_core.data.dataset import load_image

    files = make_t1_phantom(np.random.default_rng(5), "left")
    (t1,) = _write(files, tmp_path)
    assert t1.endswith("sub-01_T1w.nii.gz")
    cache = PreprocessedCache(tmp_path / "cache", {"t1": "umbrella-t1==test"})
    before = load_image(DEMO, [t1], cache=cache).numpy()
    img = nib.load(t1)
    mask = np.zeros(img.shape, np.uint8)
    mask[:, : img.shape[1] // 2] = 1  # half the head: visibly different input
    nib.save(nib.Nifti1Image(mask, img.affine), str(tmp_path / "sub-01_desc-brain_mask.nii.gz"))
    after = load_image(DEMO, [t1], cache=cache).numpy()
    assert cache.stats.misses == 2 and cache.stats.hits == 0
    np.testing.assert_array_equal(after, DEMO.load(DEMO, [t1]))
    assert not np.array_equal(before, after)
