"""Hostile image files: refused by name before anything is allocated (issue 12, points 5-8).

A header that claims more voxels than the file holds, a gzip bomb, a FIFO or
``/dev/zero`` named ``.nii.gz``, NIfTI pairs (gzipped or not), integer
scaling that overflows float32, files whose name lies about their
compression (issue 12 item 15), and an fMRI series whose repetition time in
milliseconds would be resampled into thousands of frames (item 10). Every
load runs in a child process whose address space is capped (``RLIMIT_AS``)
and whose time is bounded, so a regression shows as a failed test, never as a
CI machine out of memory or a hung job.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from umbrella_core.imaging import save_nifti

#: Address space of a child process: the interpreter with numpy and nibabel
#: takes about 120 MiB, the largest legitimate image here 256 KiB.
LIMIT = 1 << 30

_CHILD = textwrap.dedent(
    """
    import json, resource, sys
    resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
    import numpy as np
    from umbrella_core.errors import DataError
    what, path = sys.argv[1], sys.argv[2]
    try:
        if what == "load":
            from umbrella_core.imaging import load_nifti
            data, _ = load_nifti(path)
            result = {{"ok": [list(data.shape), bool(np.isfinite(data).all())]}}
        elif what.startswith("fmri"):
            # fmri:SETTINGS (JSON): the series of the demo geometry, configured.
            from umbrella_fmri.plugin import FMRI, configure
            spec = configure(FMRI.for_demo(), json.loads(what[5:]))
            data = spec.windows.series(spec, (path,))
            result = {{"ok": [list(data.shape), bool(np.isfinite(data).all())]}}
        else:
            from umbrella_core.data.checks import check_headers
            from umbrella_core.plugins import get_plugin_manager
            spec = get_plugin_manager().resolve_modality("t1").item.for_demo()
            result = {{"messages": check_headers(spec, [path])}}
    except DataError as error:
        result = {{"error": str(error)}}
    except BaseException as error:
        result = {{"crash": type(error).__name__ + ": " + str(error)[:200]}}
    print(json.dumps(result))
    """
)


def _in_child(what: str, path: Path, timeout: float = 60) -> dict:
    """Run ``load_nifti`` (``what="load"``), ``check_headers`` (``"header"``) or the fMRI
    series (``"fmri:{settings as JSON}"``) on ``path`` in a capped child."""
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    script = _CHILD.format(limit=LIMIT)
    try:
        done = subprocess.run(
            [sys.executable, "-c", script, what, str(path)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{what} of {path.name} did not return within {timeout} s (it blocked)")
    lines = done.stdout.strip().splitlines()
    assert lines, f"child died (exit {done.returncode}): {done.stderr[-2000:]}"
    return json.loads(lines[-1])


def _header(shape, dtype, **fields) -> bytes:
    """A single-file NIfTI-1 header and its 4 extension bytes (voxels start at 352)."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_sform(np.eye(4), code=1)
    header["vox_offset"] = 352
    for key, value in fields.items():
        header[key] = value
    return header.binaryblock + b"\0" * 4


def _zeros_members(total: int, chunk: int = 1 << 24) -> bytes:
    """``total`` zero bytes as concatenated gzip members: 1 GiB in about 1 MB, built fast."""
    member = gzip.compress(bytes(chunk), compresslevel=9)
    assert total % chunk == 0
    return member * (total // chunk)


# -- point 6: memory follows the file, not the header's claim ---------------------------


def test_a_tiny_file_claiming_a_huge_image_is_refused_before_allocating(tmp_path):
    # 133 bytes of gzip claiming 1600^3 voxels took 4.3 GB before "truncated".
    path = tmp_path / "tiny_T1w.nii.gz"
    path.write_bytes(gzip.compress(_header((1600, 1600, 1600), np.uint8)))
    assert path.stat().st_size < 200
    for what in ("load", "header"):
        result = _in_child(what, path)
        text = result.get("error") or " ".join(result.get("messages", [])) or str(result)
        assert text.startswith(str(path)), result
        assert "1600x1600x1600" in text and "ceiling" in text, result


def test_a_header_claiming_more_than_the_gzip_can_hold_is_refused(tmp_path):
    # Under the ceiling, so only the payload check can tell: 256^3 float32
    # (64 MiB) cannot come out of a few hundred bytes of deflate.
    path = tmp_path / "short_T1w.nii.gz"
    path.write_bytes(gzip.compress(_header((256, 256, 256), np.float32) + bytes(4096)))
    for what in ("load", "header"):
        result = _in_child(what, path)
        text = result.get("error") or " ".join(result.get("messages", [])) or str(result)
        assert text.startswith(str(path)) and "gzip can inflate to" in text, result


def test_an_uncompressed_file_shorter_than_its_header_says_is_refused(tmp_path):
    path = tmp_path / "short_T1w.nii"
    path.write_bytes(_header((400, 400, 400), np.float32) + bytes(1000))
    for what in ("load", "header"):
        result = _in_child(what, path)
        text = result.get("error") or " ".join(result.get("messages", [])) or str(result)
        assert text.startswith(str(path)) and "truncated" in text, result


def test_a_gzip_bomb_claiming_a_huge_image_is_refused_by_the_ceiling(tmp_path):
    # 1 MB that inflates to an all-zero 1024^3 image: 5.5 GB, then training on zeros.
    path = tmp_path / "bomb_T1w.nii.gz"
    path.write_bytes(gzip.compress(_header((1024, 1024, 1024), np.uint8)) + _zeros_members(1 << 30))
    assert path.stat().st_size < 2 << 20
    for what in ("load", "header"):
        result = _in_child(what, path)
        text = result.get("error") or " ".join(result.get("messages", [])) or str(result)
        assert text.startswith(str(path)) and "1024x1024x1024" in text, result


def test_a_gzip_bomb_behind_a_small_header_is_inflated_only_to_the_bound(tmp_path):
    # The header is honest-looking (64^3 bytes); the stream goes on to 1 GiB of zeros.
    path = tmp_path / "bomb_T1w.nii.gz"
    volume = np.random.default_rng(0).integers(1, 200, (64, 64, 64), dtype=np.uint8)
    first = gzip.compress(_header(volume.shape, np.uint8) + volume.tobytes(order="F"))
    path.write_bytes(first + _zeros_members(1 << 30))
    result = _in_child("load", path)
    assert "error" in result, result
    assert result["error"].startswith(str(path)) and "gzip bomb" in result["error"], result


def test_the_ceilings_can_be_raised_and_lowered(tmp_path, monkeypatch):
    from umbrella_core.errors import ConfigError, DataError
    from umbrella_core.imaging import load_nifti

    path = save_nifti(tmp_path / "a_T1w.nii.gz", np.ones((8, 8, 8), np.float32), np.eye(4))
    monkeypatch.setenv("UMBRELLA_MAX_VOLUME_VOXELS", "500")
    with pytest.raises(DataError, match="a_T1w.nii.gz: .*over the ceiling of 500"):
        load_nifti(path)
    monkeypatch.setenv("UMBRELLA_MAX_VOLUME_VOXELS", "512")
    assert load_nifti(path)[0].shape == (8, 8, 8)
    monkeypatch.setenv("UMBRELLA_MAX_VOXELS", "lots")
    with pytest.raises(ConfigError, match="UMBRELLA_MAX_VOXELS='lots'"):
        load_nifti(path)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_named_nii_gz_is_refused_without_blocking(tmp_path):
    path = tmp_path / "pipe_T1w.nii.gz"
    os.mkfifo(path)
    for what in ("load", "header"):
        result = _in_child(what, path, timeout=30)
        text = result.get("error") or " ".join(result.get("messages", [])) or str(result)
        assert text.startswith(str(path)) and "FIFO" in text, result


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_dev_zero_named_nii_gz_is_refused(tmp_path):
    path = tmp_path / "zero_T1w.nii.gz"
    path.symlink_to("/dev/zero")
    for what in ("load", "header"):
        result = _in_child(what, path, timeout=30)
        text = result.get("error") or " ".join(result.get("messages", [])) or str(result)
        assert text.startswith(str(path)) and "character device" in text, result


# -- point 7: NIfTI pairs are refused by name ------------------------------------------


@pytest.mark.parametrize("suffix", [".hdr", ".hdr.gz"])
def test_a_nifti_pair_is_refused_by_name(tmp_path, suffix):
    volume = np.arange(6 * 7 * 8, dtype=np.float32).reshape(6, 7, 8) + 1
    path = tmp_path / f"pair_T1w{suffix}"
    nib.save(nib.Nifti1Pair(volume, np.eye(4)), str(path))
    image = Path(str(path).replace(".hdr", ".img"))
    assert image.is_file()
    for given in (path, image):
        result = _in_child("load", given)
        assert "error" in result, result  # not the header's bytes read as voxels
        assert result["error"].startswith(str(given)) and "NIfTI pair" in result["error"]
        messages = _in_child("header", given)["messages"]
        assert len(messages) == 1 and messages[0] == result["error"]


def test_a_pair_header_renamed_nii_gz_is_refused_by_its_magic(tmp_path):
    volume = np.ones((6, 7, 8), np.float32)
    nib.save(nib.Nifti1Pair(volume, np.eye(4)), str(tmp_path / "pair.hdr"))
    path = tmp_path / "renamed_T1w.nii.gz"
    path.write_bytes(gzip.compress((tmp_path / "pair.hdr").read_bytes()))
    result = _in_child("load", path)
    assert result.get("error", "").startswith(str(path)), result
    assert "header of a NIfTI pair" in result["error"]


# -- point 8: scaled integers that overflow float32 ------------------------------------


def test_int16_scaled_past_float32_is_refused_by_loader_and_header_check(tmp_path):
    volume = np.arange(8**3, dtype=np.int16).reshape(8, 8, 8)
    img = nib.Nifti1Image(volume, np.eye(4))
    img.header.set_slope_inter(1e36, 0.0)
    path = tmp_path / "scaled_T1w.nii.gz"
    nib.save(img, str(path))
    result = _in_child("load", path)
    assert result.get("error", "").startswith(str(path)), result  # not inf voxels
    assert "scl_slope 1e+36" in result["error"] and "beyond float32" in result["error"]
    assert _in_child("header", path)["messages"] == [result["error"]]


def test_int16_with_sensible_scaling_still_loads(tmp_path):
    from umbrella_core.imaging import load_nifti

    volume = np.arange(8**3, dtype=np.int16).reshape(8, 8, 8)
    img = nib.Nifti1Image(volume, np.eye(4))
    img.header.set_slope_inter(0.5, 10.0)
    path = tmp_path / "scaled_T1w.nii.gz"
    nib.save(img, str(path))
    data, _ = load_nifti(path)
    np.testing.assert_allclose(data, volume * 0.5 + 10.0)


# -- point 5: header-level problems, caught without decoding --------------------------


def _write(path: Path, header: bytes, voxels: bytes) -> Path:
    payload = header + voxels
    path.write_bytes(gzip.compress(payload) if path.name.endswith(".gz") else payload)
    return path


@pytest.mark.parametrize(
    ("name", "shape", "dtype", "says"),
    [
        ("five_T1w.nii.gz", (8, 8, 8, 1, 3), np.float32, "expected a 3D or 4D image, got a 5D"),
        ("complex_T1w.nii.gz", (8, 8, 8), np.complex64, "complex-valued voxels (complex64)"),
        ("rgb_T1w.nii.gz", (8, 8, 8), np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")]), "RGB"),
    ],
)
def test_header_level_problems_are_named_by_loader_and_header_check(
    tmp_path, name, shape, dtype, says
):
    dtype = np.dtype(dtype)
    count = int(np.prod(shape))
    path = _write(tmp_path / name, _header(shape, dtype), bytes(count * dtype.itemsize))
    result = _in_child("load", path)
    assert result.get("error", "").startswith(str(path)) and says in result["error"], result
    assert _in_child("header", path)["messages"] == [result["error"]]


def test_well_formed_files_pass_the_header_check_and_load(tmp_path):
    from umbrella_core.data.checks import check_headers
    from umbrella_core.imaging import load_nifti
    from umbrella_core.plugins import get_plugin_manager

    spec = get_plugin_manager().resolve_modality("t1").item.for_demo()
    volume = np.random.default_rng(0).random((9, 10, 11)).astype(np.float32)
    for name in ("a_T1w.nii", "a_T1w.nii.gz"):
        path = save_nifti(tmp_path / name, volume, np.eye(4))
        assert check_headers(spec, [path]) == []
        np.testing.assert_array_equal(load_nifti(path)[0], volume)
    # Concatenated gzip members and zero padding after the last one are gzip too.
    raw = (tmp_path / "a_T1w.nii").read_bytes()
    padded = tmp_path / "members_T1w.nii.gz"
    padded.write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]) + bytes(64))
    np.testing.assert_array_equal(load_nifti(padded)[0], volume)


# -- issue 12 item 15: a name that lies about compression bypasses no bound ----------


def test_a_plain_nifti_named_nii_gz_reads_only_its_image_however_long_the_file(tmp_path):
    from umbrella_core.imaging import read_nifti_header

    # Read as what it is (plain), and only up to its image: a 2 GiB tail (sparse)
    # after a 64^3 uint8 image costs nothing.
    path = tmp_path / "plain_T1w.nii.gz"
    volume = np.random.default_rng(0).integers(1, 200, (64, 64, 64), dtype=np.uint8)
    path.write_bytes(_header(volume.shape, np.uint8) + volume.tobytes(order="F"))
    with path.open("r+b") as handle:
        handle.truncate(2 << 30)
    assert not read_nifti_header(path).gzipped
    result = _in_child("load", path)
    assert result == {"ok": [[64, 64, 64], True]}, result


def test_a_gzip_bomb_named_nii_is_still_inflated_only_to_the_bound(tmp_path):
    path = tmp_path / "bomb_T1w.nii"
    volume = np.random.default_rng(0).integers(1, 200, (64, 64, 64), dtype=np.uint8)
    first = gzip.compress(_header(volume.shape, np.uint8) + volume.tobytes(order="F"))
    path.write_bytes(first + _zeros_members(1 << 30))
    result = _in_child("load", path)
    assert result.get("error", "").startswith(str(path)), result
    assert "gzip bomb" in result["error"], result


# -- issue 12 item 10: a TR in milliseconds is not resampled into a huge series ---------


def test_a_tr_in_milliseconds_is_refused_before_resampling(tmp_path):
    pytest.importorskip("umbrella_fmri")
    # 20 frames at "2000 s" resampled to 2 s: 19,001 frames, 4.7 GB of float32
    # for this 32^3 grid (37 GB and a traceback in the report).
    path = tmp_path / "ms_bold.nii.gz"
    series = np.random.default_rng(0).integers(100, 200, (32, 32, 32, 20), dtype=np.int16)
    img = nib.Nifti1Image(series, np.diag([3.0, 3.0, 3.0, 1.0]))
    img.header.set_zooms((3.0, 3.0, 3.0, 2000.0))
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, str(path))
    result = _in_child('fmri:{"target_tr": 2.0}', path)
    assert result.get("error", "").startswith(str(path)), result
    assert "repetition time is 2000 s" in result["error"], result
    # Even with the TR check relaxed, the resampling itself is bounded.
    result = _in_child('fmri:{"target_tr": 2.0, "max_tr": 5000}', path)
    assert "would turn 20 frames into 19,001, more than 8x" in result.get("error", ""), result
    assert _in_child('fmri:{"target_tr": 1000.0, "max_tr": 5000}', path) == {
        "ok": [[1, 24, 24, 24, 39], True]
    }
