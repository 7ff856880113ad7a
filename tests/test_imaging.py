"""Tests of the shared NIfTI helpers in umbrella_core.imaging."""

from __future__ import annotations

import gzip
import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nibabel.testing import data_path

from umbrella_core import DataError, imaging

ANATOMICAL = os.path.join(data_path, "anatomical.nii")
FUNCTIONAL = os.path.join(data_path, "functional.nii")


def _raw_nifti(path: Path, data: np.ndarray, srow: list[list[float]]) -> Path:
    """A NIfTI whose sform is written as given (nibabel refuses to build such affines)."""
    header = nib.Nifti1Header()
    header.set_data_shape(data.shape)
    header.set_data_dtype(data.dtype)
    header["sform_code"] = 1
    header["qform_code"] = 0
    header["srow_x"], header["srow_y"], header["srow_z"] = srow
    nib.save(nib.Nifti1Image(data, None, header), str(path))
    return path


# ---------------------------------------------------------------------------
# load_nifti: bad input is a DataError naming the file
# ---------------------------------------------------------------------------


def test_missing_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "sub-01_T1w.nii.gz"
    with pytest.raises(DataError, match="sub-01_T1w.nii.gz: file not found"):
        imaging.load_nifti(path)


def test_text_with_nifti_name_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "notes_T1w.nii.gz"
    path.write_text("subject 1 was scanned twice")
    with pytest.raises(DataError, match="notes_T1w.nii.gz: not a readable NIfTI"):
        imaging.load_nifti(path)


def test_gzipped_garbage_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "garbage_T1w.nii.gz"
    with gzip.open(path, "wb") as handle:
        handle.write(np.random.default_rng(0).bytes(2000))
    with pytest.raises(DataError, match="garbage_T1w.nii.gz"):
        imaging.load_nifti(path)


@pytest.mark.parametrize("keep", [0.5, 0.05])
def test_truncated_gzip_is_refused(tmp_path: Path, keep: float) -> None:
    whole = imaging.save_nifti(
        tmp_path / "whole.nii.gz", np.random.default_rng(0).random((24, 24, 24)), np.eye(4)
    )
    data = Path(whole).read_bytes()
    path = tmp_path / "cut_T1w.nii.gz"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(DataError, match="cut_T1w.nii.gz"):
        imaging.load_nifti(path)


def test_truncated_uncompressed_file_is_refused(tmp_path: Path) -> None:
    whole = imaging.save_nifti(tmp_path / "whole.nii", np.ones((16, 16, 16), np.float32), np.eye(4))
    path = tmp_path / "short_T1w.nii"
    path.write_bytes(Path(whole).read_bytes()[:-4000])
    with pytest.raises(DataError, match="short_T1w.nii"):
        imaging.load_nifti(path)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_voxels_are_refused(tmp_path: Path, bad: float) -> None:
    data = np.ones((8, 8, 8), np.float32)
    data[2, 3, 4] = bad
    path = imaging.save_nifti(tmp_path / "nan_T1w.nii.gz", data, np.eye(4))
    with pytest.raises(DataError, match=r"nan_T1w.nii.gz: 1 of 512 voxels are NaN or infinite"):
        imaging.load_nifti(path)


def test_singular_affine_is_refused(tmp_path: Path) -> None:
    path = _raw_nifti(
        tmp_path / "flat_T1w.nii.gz",
        np.ones((4, 4, 4), np.float32),
        [[0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]],
    )
    with pytest.raises(DataError, match="flat_T1w.nii.gz: the affine .* is singular"):
        imaging.load_nifti(path)


def test_non_finite_affine_is_refused(tmp_path: Path) -> None:
    path = _raw_nifti(
        tmp_path / "nanaffine_T1w.nii.gz",
        np.ones((4, 4, 4), np.float32),
        [[1, 0, 0, float("nan")], [0, 1, 0, 0], [0, 0, 1, 0]],
    )
    with pytest.raises(DataError, match="nanaffine_T1w.nii.gz: the affine .* not finite"):
        imaging.load_nifti(path)


def test_tiny_voxels_are_not_mistaken_for_a_singular_affine(tmp_path: Path) -> None:
    affine = np.diag([1e-3, 1e-3, 1e-3, 1.0])  # a micro-MRI grid in mm
    path = imaging.save_nifti(tmp_path / "micro.nii.gz", np.ones((4, 4, 4), np.float32), affine)
    data, loaded = imaging.load_nifti(path)
    assert data.shape == (4, 4, 4)
    np.testing.assert_allclose(loaded, affine)


def test_other_formats_and_2d_images_are_refused(tmp_path: Path) -> None:
    mgz = tmp_path / "brain.mgz"
    nib.save(nib.MGHImage(np.ones((4, 4, 4), np.float32), np.eye(4)), str(mgz))
    with pytest.raises(DataError, match="brain.mgz: not a NIfTI file"):
        imaging.load_nifti(mgz)
    flat = imaging.save_nifti(tmp_path / "slice.nii.gz", np.ones((4, 4), np.float32), np.eye(4))
    with pytest.raises(DataError, match="slice.nii.gz: expected a 3D or 4D image"):
        imaging.load_nifti(flat)


# ---------------------------------------------------------------------------
# load_nifti: orientation and data type
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# What a file is, not what its name says (issue 12 item 15)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("native", [False, True])
def test_a_plain_nifti_named_nii_gz_and_a_gzipped_one_named_nii_are_read(
    tmp_path: Path, native: bool
) -> None:
    # Gzip or not is read from the first bytes: renaming is a common slip, and
    # nibabel alone fails on both ("incorrect header check", "no NIfTI header").
    volume = np.random.default_rng(0).random((9, 10, 11)).astype(np.float32)
    plain = imaging.save_nifti(tmp_path / "a.nii", volume, np.diag([2.0, 2.0, 2.0, 1.0]))
    packed = imaging.save_nifti(tmp_path / "b.nii.gz", volume, np.diag([2.0, 2.0, 2.0, 1.0]))
    expected = imaging.load_nifti(plain, native=native)
    for source, renamed in ((plain, "plain_T1w.nii.gz"), (packed, "packed_T1w.nii")):
        (tmp_path / renamed).write_bytes(Path(source).read_bytes())
        facts = imaging.read_nifti_header(tmp_path / renamed)
        assert facts.gzipped == (source == packed) and facts.shape == (9, 10, 11)
        data, affine = imaging.load_nifti(tmp_path / renamed, native=native)
        np.testing.assert_array_equal(data, expected[0])
        np.testing.assert_array_equal(affine, expected[1])


def test_a_plain_nifti_named_nii_gz_is_read_only_up_to_its_image(tmp_path: Path) -> None:
    volume = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    plain = imaging.save_nifti(tmp_path / "a.nii", volume, np.eye(4))
    path = tmp_path / "tail_T1w.nii.gz"
    path.write_bytes(Path(plain).read_bytes() + b"trailing bytes" * 100)
    np.testing.assert_array_equal(imaging.load_nifti(path)[0], volume)


def test_dicom_is_named_with_how_to_convert_it(tmp_path: Path) -> None:
    # nibabel's 0.dcm has 348 (NIfTI-1's header size) in its preamble.
    dicom = Path(data_path) / "0.dcm"
    renamed = tmp_path / "dcm_T1w.nii.gz"
    renamed.write_bytes(dicom.read_bytes())
    for path in (dicom, renamed):
        with pytest.raises(DataError, match=r"not a NIfTI file: it is a DICOM file; .*dcm2niix"):
            imaging.load_nifti(path)


def test_a_folder_is_named_for_what_it_holds(tmp_path: Path) -> None:
    # DICOM files one level down, as exported (patient/series/IM0001), no suffix.
    series = tmp_path / "dicom" / "series1"
    series.mkdir(parents=True)
    (series / "IM0001").write_bytes((Path(data_path) / "0.dcm").read_bytes())
    with pytest.raises(
        DataError, match=r"dicom: is a folder of DICOM files.*dcm2niix -z y -o OUT_FOLDER .*dicom"
    ):
        imaging.load_nifti(tmp_path / "dicom")
    anat = tmp_path / "anat"
    anat.mkdir()
    imaging.save_nifti(anat / "sub-01_T1w.nii.gz", np.ones((4, 4, 4), np.float32), np.eye(4))
    with pytest.raises(DataError, match=r"anat: is a folder.*e.g. .*anat/sub-01_T1w.nii.gz"):
        imaging.read_nifti_header(anat)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: is a folder, expected a NIfTI file"):
        imaging.load_nifti(tmp_path / "empty")
    # As the checks say it when a record names a folder.
    assert "empty: is a folder" in imaging.missing_file_message(tmp_path / "empty")


def test_symlinks_that_loop_or_lead_nowhere_are_named_as_such(tmp_path: Path) -> None:
    (tmp_path / "a.nii.gz").symlink_to("b.nii.gz")
    (tmp_path / "b.nii.gz").symlink_to("a.nii.gz")
    (tmp_path / "gone.nii.gz").symlink_to("elsewhere/gone.nii.gz")
    for path, says in (
        ("a.nii.gz", "a.nii.gz: is a symbolic link that loops"),
        ("gone.nii.gz", "gone.nii.gz: is a symbolic link to elsewhere/gone.nii.gz, which does not"),
    ):
        assert says in imaging.missing_file_message(tmp_path / path)
        with pytest.raises(DataError, match=says):
            imaging.load_nifti(tmp_path / path)


def test_a_missing_file_whose_other_suffix_exists_is_pointed_at(tmp_path: Path) -> None:
    imaging.save_nifti(tmp_path / "sub-01_T1w.nii.gz", np.ones((4, 4, 4), np.float32), np.eye(4))
    with pytest.raises(DataError, match=r"file not found \(there is sub-01_T1w.nii.gz: is that"):
        imaging.load_nifti(tmp_path / "sub-01_T1w.nii")


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"", "the file is empty (0 bytes)"),
        (b"\x89PNG\r\n\x1a\n" + bytes(600), "not a NIfTI file: it is a PNG picture"),
        (b"\xff\xd8\xff\xe0" + bytes(600), "not a NIfTI file: it is a JPEG picture"),
        (b"PK\x03\x04" + bytes(600), "not a NIfTI file: it is a ZIP archive; unpack it"),
        (gzip.compress(b"age,sex\n42,F\n"), "not a readable NIfTI file: it holds text ('age,sex')"),
        (
            gzip.compress(gzip.compress(bytes(2000))),
            "not a NIfTI file: it is gzip-compressed twice",
        ),
    ],
    ids=["empty", "png", "jpeg", "zip", "text", "gzip-twice"],
)
def test_other_contents_are_named(tmp_path: Path, content: bytes, says: str) -> None:
    path = tmp_path / "x_T1w.nii.gz"
    path.write_bytes(content)
    with pytest.raises(DataError, match=re.escape(f"x_T1w.nii.gz: {says}")):
        imaging.read_nifti_header(path)


def test_mgz_is_named_with_mri_convert(tmp_path: Path) -> None:
    path = tmp_path / "brain.mgz"
    nib.save(nib.MGHImage(np.ones((4, 4, 4), np.float32), np.eye(4)), str(path))
    with pytest.raises(DataError, match=r"brain.mgz: not a NIfTI file: it is a FreeSurfer .*mri_"):
        imaging.load_nifti(path)


def _damaged(path: Path, **fields) -> Path:
    header = nib.Nifti1Header()
    header.set_data_shape((4, 4, 4))
    header.set_data_dtype(np.float32)
    header.set_sform(np.eye(4), code=1)
    header["vox_offset"] = 352
    for key, value in fields.items():
        header[key] = value
    path.write_bytes(header.binaryblock + bytes(4) + bytes(4 * 64))
    return path


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"sizeof_hdr": 349}, "sizeof_hdr is 349, not 348: the header is damaged"),
        ({"dim": [3, 4, -4, 4, 1, 1, 1, 1]}, "the header's dim has a negative size"),
        ({"dim": [3, 4, 0, 4, 1, 1, 1, 1]}, "image is empty (a dimension of size 0"),
        ({"vox_offset": 4096}, "the header's vox_offset (4,096) is past the end of the file"),
    ],
    ids=["sizeof_hdr", "negative-dim", "zero-dim", "vox_offset"],
)
def test_damaged_headers_say_what_is_damaged(tmp_path: Path, fields: dict, says: str) -> None:
    path = _damaged(tmp_path / "d_T1w.nii", **fields)
    with pytest.raises(DataError, match=r"d_T1w.nii: .*" + re.escape(says)):
        imaging.load_nifti(path)


def test_nifti2_reads_as_nifti1_does() -> None:
    path = Path(data_path) / "example_nifti2.nii.gz"
    data, affine = imaging.load_nifti(path)
    expected = nib.as_closest_canonical(nib.load(path))
    np.testing.assert_allclose(data, expected.get_fdata(), rtol=1e-6)
    np.testing.assert_allclose(affine, expected.affine)


def test_real_las_file_matches_nibabel_canonical() -> None:
    img = nib.load(ANATOMICAL)
    assert nib.aff2axcodes(img.affine) == ("L", "A", "S")
    data, affine = imaging.load_nifti(ANATOMICAL)
    canonical = nib.as_closest_canonical(img)
    assert data.dtype == np.float32 and all(step > 0 for step in data.strides)
    np.testing.assert_array_equal(data, canonical.get_fdata().astype(np.float32))
    np.testing.assert_allclose(affine, canonical.affine)
    assert nib.aff2axcodes(affine) == imaging.RAS


def test_real_4d_file_keeps_time_last() -> None:
    data, affine = imaging.load_nifti(FUNCTIONAL)
    canonical = nib.as_closest_canonical(nib.load(FUNCTIONAL))
    assert data.shape == (17, 21, 3, 20)
    np.testing.assert_array_equal(data, canonical.get_fdata().astype(np.float32))
    np.testing.assert_allclose(affine, canonical.affine)


def test_scaling_is_applied(tmp_path: Path) -> None:
    img = nib.Nifti1Image(np.arange(27, dtype=np.int16).reshape(3, 3, 3), np.eye(4))
    img.header.set_slope_inter(0.5, 10.0)
    path = tmp_path / "scaled.nii.gz"
    nib.save(img, str(path))
    data, _ = imaging.load_nifti(path)
    np.testing.assert_allclose(data, np.arange(27).reshape(3, 3, 3) * 0.5 + 10.0)


@pytest.mark.parametrize("codes", imaging.PHANTOM_ORIENTATIONS)
def test_reorient_round_trip_preserves_world_positions(codes: tuple[str, str, str]) -> None:
    rng = np.random.default_rng(1)
    data = rng.random((5, 6, 7, 2)).astype(np.float32)
    affine = np.diag([2.0, 3.0, 4.0, 1.0])
    affine[:3, 3] = [-5.0, 7.0, 1.0]
    moved, moved_affine = imaging.reorient(data, affine, codes)
    assert nib.aff2axcodes(moved_affine) == codes
    # The same voxel content sits at the same world position.
    voxel = np.array([1, 2, 3])
    world = affine[:3, :3] @ voxel + affine[:3, 3]
    index = np.rint(np.linalg.solve(moved_affine[:3, :3], world - moved_affine[:3, 3])).astype(int)
    np.testing.assert_array_equal(moved[tuple(index)], data[tuple(voxel)])
    back, back_affine = imaging.reorient(moved, moved_affine, imaging.RAS)
    np.testing.assert_array_equal(back, data)
    np.testing.assert_allclose(back_affine, affine)


# ---------------------------------------------------------------------------
# save_nifti
# ---------------------------------------------------------------------------


def test_save_nifti_round_trip_keeps_dtype_affine_and_tr(tmp_path: Path) -> None:
    data = np.arange(4 * 5 * 6 * 3, dtype=np.int16).reshape(4, 5, 6, 3)
    affine = np.diag([-2.0, 2.0, 2.5, 1.0])
    path = imaging.save_nifti(tmp_path / "deep" / "sub-01_bold.nii.gz", data, affine, tr=1.5)
    img = nib.load(path)
    assert img.get_data_dtype() == np.int16
    np.testing.assert_array_equal(np.asarray(img.dataobj), data)
    np.testing.assert_allclose(img.affine, affine)
    assert img.header.get_zooms()[3] == pytest.approx(1.5)
    assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1


# ---------------------------------------------------------------------------
# resize
# ---------------------------------------------------------------------------


def test_resize_keeps_trailing_axes_and_constants() -> None:
    series = np.full((10, 12, 14, 5), 3.0, np.float32)
    out = imaging.resize(series, (4, 6, 8))
    assert out.shape == (4, 6, 8, 5) and out.dtype == np.float32
    np.testing.assert_allclose(out, 3.0)


def test_resize_does_not_mix_time_points() -> None:
    series = np.zeros((6, 6, 6, 3), np.float32)
    series[..., 1] = 1.0  # only the middle frame is on
    out = imaging.resize(series, (3, 3, 3))
    np.testing.assert_allclose(out[..., 0], 0.0)
    np.testing.assert_allclose(out[..., 1], 1.0)


def test_resize_keeps_the_field_of_view() -> None:
    # A linear ramp resampled with align_corners=False stays a ramp over the same extent.
    ramp = np.broadcast_to(np.arange(8, dtype=np.float32)[:, None, None], (8, 4, 4))
    out = imaging.resize(ramp, (4, 4, 4))
    np.testing.assert_allclose(out[:, 0, 0], [0.5, 2.5, 4.5, 6.5])


@settings(max_examples=20, deadline=None)
@given(
    shape=st.tuples(*[st.integers(2, 9)] * 3),
    target=st.tuples(*[st.integers(1, 9)] * 3),
)
def test_resize_stays_within_the_input_range(
    shape: tuple[int, int, int], target: tuple[int, int, int]
) -> None:
    data = np.random.default_rng(sum(shape)).random(shape).astype(np.float32)
    out = imaging.resize(data, target)
    assert out.shape == target
    assert data.min() - 1e-6 <= out.min() and out.max() <= data.max() + 1e-6


def test_resize_rejects_bad_targets() -> None:
    with pytest.raises(ValueError, match="1 to 3 entries"):
        imaging.resize(np.zeros((4, 4, 4, 4)), (2, 2, 2, 2))
    with pytest.raises(ValueError, match="positive"):
        imaging.resize(np.zeros((4, 4, 4)), (2, 0, 2))


# ---------------------------------------------------------------------------
# Intensity normalisation
# ---------------------------------------------------------------------------


def test_robust_normalise_ignores_zero_background_and_clips_outliers() -> None:
    data = np.zeros((10, 10, 10), np.float32)
    data[2:8, 2:8, 2:8] = np.linspace(100.0, 200.0, 216).reshape(6, 6, 6)
    data[5, 5, 5] = 1e6  # a single hot voxel must not squash the rest
    out = imaging.robust_normalise(data, 0.5, 99.5)
    assert out.dtype == np.float32 and out.min() == 0.0 and out.max() == 1.0
    assert out[0, 0, 0] == 0.0
    inside = out[2:8, 2:8, 2:8]
    assert 0.4 < float(np.median(inside)) < 0.6  # the tissue range spans [0, 1], not [0, 1e-4]


def test_robust_normalise_of_a_constant_image_is_zero() -> None:
    np.testing.assert_array_equal(imaging.robust_normalise(np.full((3, 3, 3), 7.0)), 0.0)
    np.testing.assert_array_equal(imaging.robust_normalise(np.zeros((3, 3, 3))), 0.0)


def test_zscore_time_per_voxel_and_constant_voxels() -> None:
    rng = np.random.default_rng(0)
    series = rng.normal(50.0, 3.0, size=(3, 3, 3, 40)).astype(np.float32)
    series[0, 0, 0] = 12.0  # a constant voxel
    out = imaging.zscore_time(series)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out[0, 0, 0], 0.0)
    np.testing.assert_allclose(out[1:].mean(axis=-1), 0.0, atol=1e-5)
    np.testing.assert_allclose(out[1:].std(axis=-1), 1.0, atol=1e-4)


# ---------------------------------------------------------------------------
# Phantom building blocks
# ---------------------------------------------------------------------------


def test_head_phantom_is_deterministic_and_plausible() -> None:
    a = imaging.head_phantom(np.random.default_rng(3), (24, 28, 24), (7.0, 7.0, 7.0))
    b = imaging.head_phantom(np.random.default_rng(3), (24, 28, 24), (7.0, 7.0, 7.0))
    np.testing.assert_array_equal(a.wm, b.wm)
    total = a.wm + a.gm + a.csf + a.scalp
    assert total.max() <= 1.0 + 1e-5 and min(m.min() for m in (a.wm, a.gm, a.csf)) >= 0.0
    assert a.wm.sum() > 0 and a.gm.sum() > 0 and a.csf.sum() > 0
    assert a.wm[0, 0, 0] == pytest.approx(0.0, abs=1e-4)  # a corner is air
    with pytest.raises(ValueError, match="unknown tissues"):
        a.image({"bone": 1.0})


@pytest.mark.parametrize("side, sign", [("left", -1), ("right", 1)])
def test_hemisphere_blob_is_on_its_side_in_world_coordinates(side: str, sign: int) -> None:
    rng = np.random.default_rng(7)
    head = imaging.head_phantom(rng, (24, 28, 24), (7.0, 7.0, 7.0))
    centre = imaging.hemisphere_centre(rng, head, side)
    weight = imaging.blob(head.shape, head.affine, centre, 20.0)
    world = imaging.world_grid(head.shape, head.affine)
    x_centroid = float((world[..., 0] * weight).sum() / weight.sum())
    assert np.sign(x_centroid) == sign
    assert x_centroid == pytest.approx(centre[0], abs=3.0)
    with pytest.raises(ValueError, match="left' or 'right"):
        imaging.hemisphere_centre(rng, head, "middle")


def test_zscore_masked_centres_the_foreground_and_zeroes_the_rest() -> None:
    data = np.zeros((6, 6, 6), np.float32)
    data[1:5, 1:5, 1:5] = np.random.default_rng(0).normal(300.0, 40.0, (4, 4, 4))
    mask = data > 0
    out = imaging.zscore_masked(data, mask)
    assert out.dtype == np.float32
    assert out[~mask].tolist() == [0.0] * int((~mask).sum())
    assert abs(float(out[mask].mean())) < 1e-5 and float(out[mask].std()) == pytest.approx(
        1.0, abs=1e-5
    )
    np.testing.assert_array_equal(imaging.zscore_masked(data, np.zeros_like(mask)), 0.0)
    np.testing.assert_array_equal(
        imaging.zscore_masked(np.ones((3, 3, 3)), np.ones((3, 3, 3), bool)), 0.0
    )
    with pytest.raises(ValueError, match="mask shape"):
        imaging.zscore_masked(data, mask[:3])


def test_hemisphere_mask_splits_at_the_midline() -> None:
    head = imaging.head_phantom(np.random.default_rng(2), (24, 28, 24), (7.0, 7.0, 7.0))
    left = imaging.hemisphere_mask(head, "left")
    right = imaging.hemisphere_mask(head, "right")
    np.testing.assert_allclose(left + right, 1.0, atol=1e-5)
    x = imaging.world_grid(head.shape, head.affine)[..., 0]
    assert (left[x < -7.0] > 0.99).all() and (left[x > 7.0] < 0.01).all()


def test_head_phantom_jitter_moves_the_head() -> None:
    still = [
        imaging.head_phantom(
            np.random.default_rng(s), (24, 28, 24), (7.0,) * 3, position_jitter=0.0
        )
        for s in range(2)
    ]
    moved = [
        imaging.head_phantom(
            np.random.default_rng(s), (24, 28, 24), (7.0,) * 3, position_jitter=3.0
        )
        for s in range(2)
    ]
    np.testing.assert_allclose(still[0].affine, still[1].affine)
    assert not np.allclose(moved[0].affine, moved[1].affine)


@pytest.mark.parametrize("name", ["example4d.nii.gz", "example_nifti2.nii.gz"])
def test_in_memory_gzip_path_gives_what_nibabel_gives(name):
    from nibabel.testing import data_path

    reference = nib.as_closest_canonical(nib.load(data_path / name))
    data, affine = imaging.load_nifti(data_path / name)
    assert np.array_equal(data, np.asarray(reference.dataobj, dtype=np.float32))
    assert np.allclose(affine, reference.affine)


@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float32, ">i2"])
def test_in_memory_path_applies_scaling_and_byte_order_like_nibabel(tmp_path, dtype):
    data = (np.arange(4 * 5 * 6).reshape(4, 5, 6) % 200).astype(dtype)
    img = nib.Nifti1Image(data, np.diag([-2.0, 2.0, 2.0, 1.0]))
    img.header.set_slope_inter(2.5, -10.0)
    path = tmp_path / "scaled.nii.gz"
    nib.save(img, path)
    reference = nib.as_closest_canonical(nib.load(path))
    loaded, _ = imaging.load_nifti(path)
    assert np.allclose(loaded, np.asarray(reference.dataobj, dtype=np.float32))
    assert loaded.min() == pytest.approx(-10.0)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_native_load_keeps_the_stored_type_and_matches_the_float_load(tmp_path, suffix):
    data = np.random.default_rng(0).integers(-500, 3000, (7, 8, 9)).astype(np.int16)
    path = tmp_path / f"las{suffix}"
    nib.save(nib.Nifti1Image(data, np.diag([-2.0, 2.0, 2.0, 1.0])), path)
    native, affine = imaging.load_nifti(path, native=True)
    floats, float_affine = imaging.load_nifti(path)
    assert native.dtype == np.int16 and floats.dtype == np.float32
    np.testing.assert_array_equal(native, floats)
    np.testing.assert_array_equal(affine, float_affine)
    # Scaled files cannot stay integers: they come back as float32, scaled.
    img = nib.Nifti1Image(data, np.eye(4))
    img.header.set_slope_inter(0.5, 1.0)
    nib.save(img, tmp_path / f"scaled{suffix}")
    scaled, _ = imaging.load_nifti(tmp_path / f"scaled{suffix}", native=True)
    assert scaled.dtype == np.float32 and scaled.max() == pytest.approx(data.max() * 0.5 + 1.0)


def test_resize_of_views_in_any_layout_gives_the_same_values() -> None:
    volume = np.random.default_rng(1).normal(size=(20, 24, 22)).astype(np.float32)
    reference = imaging.resize(np.ascontiguousarray(volume), (9, 11, 10))
    for view in (
        np.asfortranarray(volume),
        np.asfortranarray(volume[::-1])[::-1],
        np.asfortranarray(volume.transpose(2, 0, 1)).transpose(1, 2, 0),
        np.asfortranarray(volume.astype(np.float64)),
    ):
        out = imaging.resize(view, (9, 11, 10))
        assert out.dtype == np.float32 and min(out.strides) > 0
        np.testing.assert_allclose(out, reference, atol=1e-5)


def test_robust_zscore_equals_clip_then_zscore_and_is_exactly_zero_outside() -> None:
    rng = np.random.default_rng(3)
    volume = np.zeros((40, 44, 36), np.float32)
    volume[5:35, 6:38, 4:30] = rng.normal(400.0, 60.0, (30, 32, 26))
    volume[20, 20, 20] = 1e5  # an outlier the upper percentile clips
    volume = np.asfortranarray(volume)
    unit = imaging.robust_normalise(volume, lower=0.5, upper=99.9)
    expected = imaging.zscore_masked(unit, unit > 0.1)
    got = imaging.robust_zscore(volume.copy(order="F"), lower=0.5, upper=99.9, foreground=0.1)
    # Percentiles come from a subgrid, so the clip points differ a little.
    np.testing.assert_allclose(got, expected, atol=0.02)
    assert float(got.max()) < 5.0
    assert np.signbit(got[expected == 0]).sum() == 0 and (got[expected == 0] == 0).all()
    mask = np.zeros(volume.shape, bool)
    mask[10:30, 10:30, 10:25] = True
    masked = imaging.robust_zscore(volume.copy(order="F"), lower=0.5, upper=99.9, mask=mask)
    assert (masked[~mask] == 0).all()
    assert float(masked[mask].mean()) == pytest.approx(0.0, abs=1e-4)
    assert float(masked[mask].std()) == pytest.approx(1.0, abs=1e-4)
    empty = imaging.robust_zscore(
        np.zeros((8, 8, 8), np.float32), lower=1, upper=99, foreground=0.1
    )
    assert (empty == 0).all()
    with pytest.raises(ValueError, match="exactly one"):
        imaging.robust_zscore(volume, lower=1, upper=99)
