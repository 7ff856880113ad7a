"""Tests of raw DWI input: a tensor fit on dipy's real crops and on a phantom of known tensors.

dipy ships small real DWI crops inside its wheel (``dipy/data/files``): ``get_fnames``
returns their local paths and downloads nothing.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from umbrella_dmri import dwi
from umbrella_dmri.plugin import DMRI
from umbrella_dmri.preprocess import FA_CENTRE, FA_SCALE

from umbrella_core import DataError, imaging
from umbrella_core.testing import modules_imported_by

pytest.importorskip("dipy")

SPEC = DMRI.with_geometry((16, 16, 16), (8, 8, 8))


def _dipy_files(name: str) -> tuple[str, str, str]:
    from dipy.data import get_fnames

    image, bval, bvec = (str(p) for p in get_fnames(name=name))
    return image, bval, bvec


def _copy_series(name: str, folder: Path, stem: str = "sub-01_dwi") -> tuple[str, str, str]:
    image, bval, bvec = _dipy_files(name)
    suffix = ".nii.gz" if image.endswith(".gz") else ".nii"
    targets = (folder / f"{stem}{suffix}", folder / f"{stem}.bval", folder / f"{stem}.bvec")
    for source, target in zip((image, bval, bvec), targets, strict=True):
        shutil.copyfile(source, target)
    return tuple(str(t) for t in targets)  # type: ignore[return-value]


def _dipy_maps(image: str, bval: str, bvec: str) -> tuple[np.ndarray, np.ndarray]:
    """dipy's own FA and MD of the whole crop (no mask), in RAS like the loader."""
    import dipy.reconst.dti as dti
    from dipy.core.gradients import gradient_table
    from dipy.io import read_bvals_bvecs

    data, _ = imaging.load_nifti(image)
    bvals, bvecs = read_bvals_bvecs(bval, bvec)
    bvecs = np.nan_to_num(bvecs)  # small_64D writes nan as the b=0 direction
    fit = dti.TensorModel(gradient_table(bvals, bvecs=bvecs)).fit(data)
    return np.nan_to_num(fit.fa), fit.md


# ---------------------------------------------------------------------------
# Real data: dipy's crops (64 directions, b=1000; 101 directions, multi-shell)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["small_64D", "small_101D"])
def test_real_series_gives_fa_and_md_like_dipy(tmp_path: Path, name: str) -> None:
    image, bval, bvec = _copy_series(name, tmp_path)
    fa, md = _dipy_maps(image, bval, bvec)
    # At the native grid, FA inside the brain mask is dipy's own FA.
    native = DMRI.with_geometry(fa.shape, fa.shape)
    exact = native.load(native, image)  # the .bval and .bvec are found next to it
    mask = exact[0] != 0
    assert mask.sum() >= 50  # a crop inside the brain: the mask keeps its brighter part
    # Up to the directions' rounding, which the loader renormalises to unit length.
    np.testing.assert_allclose(
        exact[0][mask] * FA_SCALE + FA_CENTRE, np.clip(fa[mask], 0, 1), atol=5e-3
    )
    # At the model's grid: the shape, a zero background, and still dipy's maps.
    out = SPEC.load(SPEC, image)
    assert out.shape == (2, 16, 16, 16) and out.dtype == np.float32 and np.isfinite(out).all()
    brain = out[0] != 0
    assert (out[:, ~brain] == 0).all()
    expected_fa, expected_md = (imaging.resize(np.where(mask, m, 0), SPEC.shape) for m in (fa, md))
    assert np.corrcoef(out[0][brain], expected_fa[brain])[0, 1] > 0.95
    assert np.corrcoef(out[1][brain], expected_md[brain])[0, 1] > 0.9
    # Explicit paths, in any order, give the same input.
    np.testing.assert_array_equal(SPEC.load(SPEC, [bvec, image, bval]), out)


def test_series_and_its_fitted_maps_as_files_give_the_same_input(tmp_path: Path) -> None:
    # MD from a series goes through the same normalisation as an MD map file.
    image, bval, bvec = _copy_series("small_101D", tmp_path)
    data, affine = imaging.load_nifti(image)
    count = data.shape[3]
    fa, md = dwi.fit_dti(
        data,
        dwi.read_bvals(bval, count, image),
        dwi.read_bvecs(bvec, count, image),
        image=image,
        bval_path=bval,
        bvec_path=bvec,
    )
    assert 2e-4 < float(np.median(md[md > 0])) < 2e-3  # mm^2/s
    maps = [
        imaging.save_nifti(tmp_path / f"fit_{n}.nii.gz", m, affine)
        for n, m in (("FA", fa), ("MD", md))
    ]
    np.testing.assert_allclose(SPEC.load(SPEC, maps), SPEC.load(SPEC, image), atol=1e-5)


def test_fsl_bvals_bvecs_in_the_folder_are_found(tmp_path: Path) -> None:
    image, bval, bvec = _copy_series("small_25", tmp_path, stem="data")
    Path(bval).rename(tmp_path / "bvals")
    Path(bvec).rename(tmp_path / "bvecs")
    out = SPEC.load(SPEC, image)
    assert out.shape == (2, 16, 16, 16) and (out[0] != 0).any()


def test_importing_the_loader_does_not_import_dipy() -> None:
    code = "import umbrella_dmri.plugin, umbrella_dmri.preprocess"
    assert modules_imported_by(code, ("dipy",)) == []


# ---------------------------------------------------------------------------
# A phantom of known tensors
# ---------------------------------------------------------------------------


def _directions(count: int) -> np.ndarray:
    """Evenly spread unit vectors on a half sphere (a Fibonacci lattice)."""
    i = np.arange(count) + 0.5
    z = i / count
    theta = np.pi * (1 + 5**0.5) * i
    r = np.sqrt(1 - z**2)
    return np.stack([r * np.cos(theta), r * np.sin(theta), z], axis=1)


def _phantom_series(folder: Path) -> tuple[str, dict[str, np.ndarray]]:
    """A head (ellipsoid) of grey matter, a white-matter tract along x and a CSF ball.

    Written LAS (x flipped), with 2 b=0 and 30 b=1000 volumes and a little noise.
    """
    from dipy.core.gradients import gradient_table
    from dipy.sims.voxel import single_tensor

    bvals = np.r_[0.0, 0.0, np.full(30, 1000.0)]
    bvecs = np.r_[np.zeros((2, 3)), _directions(30)]
    gtab = gradient_table(bvals, bvecs=bvecs)
    n = 40
    x, y, z = np.meshgrid(*(np.arange(n) - (n - 1) / 2,) * 3, indexing="ij")
    head = (x / 16) ** 2 + (y / 18) ** 2 + (z / 16) ** 2 <= 1
    tract = head & (np.abs(y) <= 3) & (np.abs(z) <= 3) & (x < -2)  # left half, in RAS
    csf = head & ((x - 7) ** 2 + (y - 7) ** 2 + z**2 <= 16)
    tissues = {
        "grey": (head & ~tract & ~csf, np.array([0.8e-3, 0.8e-3, 0.8e-3])),
        "tract": (tract, np.array([1.7e-3, 0.3e-3, 0.3e-3])),
        "csf": (csf, np.array([3.0e-3, 3.0e-3, 3.0e-3])),
    }
    rng = np.random.default_rng(0)
    sigma = 20.0  # SNR 50 at b=0; the background is Rayleigh noise, as in magnitude images
    data = np.zeros((n, n, n, bvals.size))
    for region, evals in tissues.values():
        data[region] = single_tensor(gtab, S0=1000.0, evals=evals, evecs=np.eye(3))
    noise = rng.normal(0.0, sigma, (2, *data.shape))
    data = np.hypot(data + noise[0], noise[1])
    affine = np.diag([-2.0, 2.0, 2.0, 1.0])
    affine[0, 3] = 2.0 * (n - 1)
    image = imaging.save_nifti(folder / "ph_dwi.nii.gz", data[::-1].astype(np.float32), affine)
    np.savetxt(folder / "ph_dwi.bval", bvals[None], fmt="%g")
    np.savetxt(folder / "ph_dwi.bvec", bvecs.T, fmt="%.6f")
    return image, {name: region for name, (region, _) in tissues.items()} | {"head": head}


def test_phantom_fa_is_high_in_the_tract_and_md_high_in_csf(tmp_path: Path) -> None:
    image, regions = _phantom_series(tmp_path)
    spec = DMRI.with_geometry((40, 40, 40), (8, 8, 8))  # native grid: no resampling
    out = spec.load(spec, image)
    fa = out[0] * FA_SCALE + FA_CENTRE
    brain = out[0] != 0
    head = regions["head"]
    assert (brain & ~head).sum() == 0 and (brain & head).sum() > 0.9 * head.sum()  # median_otsu
    assert float(np.median(fa[regions["tract"]])) > 0.7  # true FA 0.80
    assert float(np.median(fa[regions["grey"] & brain])) < 0.15  # true FA 0
    md = out[1]
    assert float(np.median(md[regions["csf"]])) > 2.0 > float(np.median(md[regions["grey"]]))
    assert fa[regions["tract"]].mean() > fa[np.flip(regions["tract"], 0)].mean() + 0.5  # left


# ---------------------------------------------------------------------------
# Errors, each naming the file
# ---------------------------------------------------------------------------


@pytest.fixture
def series(tmp_path: Path) -> tuple[str, str, str]:
    return _copy_series("small_25", tmp_path)  # 26 volumes: one b=0, 25 at b=2000


def _rewrite(path: str, text: str) -> str:
    Path(path).write_text(text)
    return path


def test_series_without_gradient_files_is_refused_naming_them(series) -> None:
    image, bval, bvec = series
    Path(bval).unlink()
    Path(bvec).unlink()
    with pytest.raises(DataError, match=r"sub-01_dwi.nii.gz: .* no bval file \(.*sub-01_dwi.bval"):
        SPEC.load(SPEC, image)


def test_series_without_its_bvec_is_refused_naming_it(series) -> None:
    image, bval, bvec = series
    Path(bvec).unlink()
    with pytest.raises(DataError, match=r"no bvec file \(.*sub-01_dwi.bvec not found"):
        SPEC.load(SPEC, [image, bval])


def test_wrong_bval_count_is_refused(series) -> None:
    image, bval, bvec = series
    _rewrite(bval, " ".join(["0"] + ["2000"] * 24))
    with pytest.raises(DataError, match=r"sub-01_dwi.bval: 25 b-values but .*has 26 volumes"):
        SPEC.load(SPEC, image)


def test_wrong_bvec_shape_is_refused(series) -> None:
    image, bval, bvec = series
    _rewrite(bvec, "\n".join(" ".join(["0.5"] * 26) for _ in range(2)))
    with pytest.raises(DataError, match=r"sub-01_dwi.bvec: expected 3 rows of 26 .*\(2, 26\)"):
        SPEC.load(SPEC, image)


def test_series_without_b0_is_refused(series) -> None:
    image, bval, bvec = series
    _rewrite(bval, " ".join(["2000"] * 26))
    with pytest.raises(DataError, match=r"sub-01_dwi.bval: no b=0 volume"):
        SPEC.load(SPEC, image)


@pytest.mark.parametrize("which", ["bval", "bvec"])
def test_non_finite_gradients_are_refused(series, which: str) -> None:
    image, bval, bvec = series
    if which == "bval":
        _rewrite(bval, " ".join(["0", "nan"] + ["2000"] * 24))
        message = r"sub-01_dwi.bval: the b-value file holds NaN or infinite values"
    else:
        rows = np.loadtxt(bvec)
        rows[0, 3] = np.inf
        np.savetxt(bvec, rows)
        message = r"sub-01_dwi.bvec: the gradient directions of 1 diffusion-weighted volumes"
    with pytest.raises(DataError, match=message):
        SPEC.load(SPEC, image)


def test_too_few_directions_are_refused(series) -> None:
    image, bval, bvec = series
    _rewrite(bval, " ".join(["0"] * 22 + ["2000"] * 4))
    with pytest.raises(DataError, match=r"sub-01_dwi.bval: 4 diffusion-weighted volumes"):
        SPEC.load(SPEC, image)
    _rewrite(bval, " ".join(["0"] + ["2000"] * 25))
    _rewrite(bvec, "\n".join(" ".join([v] * 26) for v in ("1", "0", "0")))  # one direction
    with pytest.raises(DataError, match=r"sub-01_dwi.bvec: the gradient directions .* do not"):
        SPEC.load(SPEC, image)


def test_gradient_files_with_two_images_are_refused(series) -> None:
    image, bval, bvec = series
    with pytest.raises(DataError, match=r"one 4D NIfTI file .*got 4 files: .*sub-01_dwi.bval"):
        SPEC.load(SPEC, [image, image, bval, bvec])


def test_gradient_files_with_a_3d_image_are_refused(series, tmp_path: Path) -> None:
    _, bval, bvec = series
    flat = imaging.save_nifti(tmp_path / "flat.nii.gz", np.ones((4, 4, 4), np.float32), np.eye(4))
    with pytest.raises(DataError, match=r"flat.nii.gz: expected a 4D diffusion-weighted series"):
        SPEC.load(SPEC, [flat, bval, bvec])


def test_gradient_file_names() -> None:
    assert dwi.gradient_kind("/a/sub-01_dwi.bval") == "bval"
    assert dwi.gradient_kind("/a/bvecs") == "bvec"
    assert dwi.gradient_kind("/a/sub-01_dwi.nii.gz") is None


def test_cache_key_follows_the_gradient_files_found_next_to_the_series(tmp_path: Path) -> None:
    from umbrella_dmri import plugin

    from umbrella_core.data.cache import PreprocessedCache

    image, bval, bvec = _copy_series("small_25", tmp_path)
    cache = PreprocessedCache(tmp_path / "cache", {"dmri": "umbrella-dmri==test"})
    assert plugin.companions(SPEC, [image]) == [bval, bvec]
    key = cache.key(SPEC, [image])
    with open(bval, "a", encoding="utf-8") as handle:
        handle.write("\n")
    assert cache.key(SPEC, [image]) != key
