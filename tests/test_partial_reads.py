"""Some frames of a 4D series read alone (``imaging.read_frames``), through saved gzip indexes."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.testing import data_path

from umbrella_core import DataError, imaging
from umbrella_core.imaging import frames as frames_module

EXAMPLE4D = os.path.join(data_path, "example4d.nii.gz")
FUNCTIONAL = os.path.join(data_path, "functional.nii")


@pytest.fixture
def small_spacing(monkeypatch):
    # Seek points every 64 KiB, so a series of a few hundred KiB has many of them.
    monkeypatch.setattr(frames_module, "INDEX_SPACING", 1 << 16)


def _nifti_bytes(seed: int, frames: int = 24) -> bytes:
    data = np.random.default_rng(seed).integers(0, 4000, (16, 16, 8, frames), np.int16)
    return nib.Nifti1Image(data, np.diag([-3.0, 3.0, 3.0, 1.0])).to_bytes()  # LAS


def _noise_series(path: Path, seed: int) -> str:
    """A gzipped (or, named .nii, plain) int16 noise series."""
    import gzip

    raw = _nifti_bytes(seed)
    Path(path).write_bytes(gzip.compress(raw, mtime=0) if str(path).endswith("gz") else raw)
    return str(path)


def _gzip(raw: bytes, size: int) -> bytes:
    """``raw`` as one gzip member of exactly ``size`` bytes: a header comment pads it."""
    import zlib

    packer = zlib.compressobj(6, zlib.DEFLATED, -15)
    body = packer.compress(raw) + packer.flush()
    trailer = zlib.crc32(raw).to_bytes(4, "little") + len(raw).to_bytes(4, "little")
    padding = size - (10 + len(body) + len(trailer) + 1)
    assert padding >= 0
    header = b"\x1f\x8b\x08\x10" + bytes(6) + b"x" * padding + b"\0"  # FLG.FCOMMENT
    return header + body + trailer


@pytest.mark.usefixtures("small_spacing")
def test_frames_read_alone_are_the_frames_of_the_whole_series(tmp_path: Path) -> None:
    path = _noise_series(tmp_path / "sub-01_bold.nii.gz", 0)
    whole, affine = imaging.load_nifti(path)
    index = tmp_path / "index"
    for start, stop in [(5, 9), (0, 3), (20, 24), (5, 9)]:  # the last from the saved index
        data, found = imaging.read_frames(path, start, stop, index_dir=index)
        assert np.array_equal(data, whole[..., start:stop])
        np.testing.assert_array_equal(found, affine)
        assert all(step > 0 for step in data.strides)
    assert len(list(index.glob("*.gzidx"))) == 1


@pytest.mark.parametrize("name", ["example4d.nii.gz", "functional.nii"])
def test_frames_of_nibabels_real_series(tmp_path: Path, name: str) -> None:
    # example4d: gzip, LAS, 2 frames of 128x96x24; functional: plain .nii, LAS, with scaling.
    path = os.path.join(data_path, name)
    reference = np.asarray(nib.as_closest_canonical(nib.load(path)).dataobj, dtype=np.float32)
    count = reference.shape[3]
    whole, _ = imaging.read_frames(path, 0, count, index_dir=tmp_path)
    np.testing.assert_allclose(whole, reference, rtol=1e-6)
    for start in range(count):
        data, _ = imaging.read_frames(path, start, start + 1, index_dir=tmp_path)
        assert np.array_equal(data, whole[..., start : start + 1])


@pytest.mark.usefixtures("small_spacing")
def test_a_changed_file_is_read_anew_not_through_its_old_index(tmp_path: Path) -> None:
    path = tmp_path / "sub-01_bold.nii.gz"
    first, second = _nifti_bytes(0), _nifti_bytes(1)
    path.write_bytes(_gzip(first, len(first)))
    index = tmp_path / "index"
    imaging.read_frames(path, 10, 12, index_dir=index)
    before = os.stat(path)
    # Same size and same modification time: only the content (the gzip trailer) tells.
    path.write_bytes(_gzip(second, before.st_size))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(path).st_size == before.st_size
    data, _ = imaging.read_frames(path, 10, 12, index_dir=index)
    assert np.array_equal(data, imaging.load_nifti(path)[0][..., 10:12])
    assert len(list(index.glob("*.gzidx"))) == 1  # the old file's index is gone


@pytest.mark.usefixtures("small_spacing")
def test_a_damaged_index_is_rebuilt(tmp_path: Path) -> None:
    path = _noise_series(tmp_path / "sub-01_bold.nii.gz", 0)
    index = tmp_path / "index"
    imaging.read_frames(path, 3, 4, index_dir=index)
    (saved,) = index.glob("*.gzidx")
    saved.write_bytes(saved.read_bytes()[:100])
    data, _ = imaging.read_frames(path, 14, 16, index_dir=index)
    assert np.array_equal(data, imaging.load_nifti(path)[0][..., 14:16])
    assert saved.stat().st_size > 100


def test_a_folder_that_cannot_hold_indexes_is_named_once_and_reads_go_on(
    tmp_path: Path, capsys
) -> None:
    path = _noise_series(tmp_path / "sub-01_bold.nii.gz", 0)
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    for start in (2, 7):
        data, _ = imaging.read_frames(path, start, start + 1, index_dir=blocked / "index")
        assert np.array_equal(data, imaging.load_nifti(path)[0][..., start : start + 1])
    assert capsys.readouterr().err.count("cannot save gzip indexes") == 1


@pytest.mark.usefixtures("small_spacing")
def test_a_truncated_series_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = _noise_series(tmp_path / "sub-01_bold.nii.gz", 0)
    raw = Path(path).read_bytes()
    Path(path).write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match=r"sub-01_bold.nii.gz: cannot decode the image data"):
        imaging.read_frames(path, 20, 22, index_dir=tmp_path / "index")
    with pytest.raises(DataError, match=r"sub-01_bold.nii.gz: cannot decode the image data"):
        imaging.read_frames(path, 0, 24, index_dir=tmp_path / "index")
    plain = _noise_series(tmp_path / "sub-02_bold.nii", 0)
    Path(plain).write_bytes(Path(plain).read_bytes()[:-100])
    with pytest.raises(DataError, match=r"sub-02_bold.nii: truncated"):
        imaging.read_frames(plain, 20, 22)


def test_a_volume_is_not_a_series(tmp_path: Path) -> None:
    path = imaging.save_nifti(tmp_path / "t1.nii.gz", np.ones((4, 4, 4), np.int16), np.eye(4))
    with pytest.raises(DataError, match=r"t1.nii.gz: expected a 4D series"):
        imaging.read_frames(path, 0, 1)
    with pytest.raises(ValueError, match=r"frames 1:3 are not within its 2 frames"):
        imaging.read_frames(EXAMPLE4D, 1, 3)


def test_indexes_live_under_the_umbrella_cache(umbrella_cache: Path) -> None:
    from umbrella_core.data.demo import demo_cache_dir

    assert imaging.default_series_root() == demo_cache_dir() / "series"
    imaging.read_frames(EXAMPLE4D, 1, 2)
    assert list((umbrella_cache / "series" / "gzip").glob("*.gzidx"))
