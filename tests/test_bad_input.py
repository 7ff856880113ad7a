"""Bad input through the real entry points: one clear error, or a counted skip (I6, I7).

Each case breaks one record (or the whole study) of a small clean study (t1 and
fmri at demo geometry) and checks what a user sees:

* ``umbrella validate`` reports exactly one problem naming the file (and
  line/field) and saying what to do;
* ``umbrella train`` (``data.on_bad=stop``, the default) stops before step 1
  with that error and leaves an earlier run's outputs in the same output
  folder byte-identical, even with ``--overwrite``;
* ``umbrella train --set data.on_bad=skip`` trains without the bad samples and
  lists each of them in ``OUTPUT_DIR/bad_samples.json``.

Problems visible in the NIfTI header are caught by the default
``data.check=files`` (also 5-D images, NIfTI pairs, complex or RGB voxels,
headers claiming more voxels than the ceiling or the file, gzip bombs, FIFOs,
integer scaling past float32: none is decoded, see tests/test_hostile_files.py
for their memory bounds); those that need the voxels decoded (truncated data,
NaN, all-zero images, a 4D series given as a T1) by ``data.check=full`` (and
``umbrella validate``).

Files that are not NIfTI are named for what they are, with how to convert
them: DICOM files and folders (dcm2niix), FreeSurfer's MGZ (mri_convert),
pictures, text; so are symlinks that loop or lead nowhere, empty files,
folders, and a path whose other NIfTI suffix exists. An fMRI repetition time
in milliseconds labelled as seconds (nibabel's own example4d.nii.gz) is
refused from the header or the JSON sidecar. Files that only look wrong (a
plain NIfTI named ``.nii.gz``) are read, so they are not cases here
(tests/test_imaging.py).
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import attrs
import nibabel as nib
import numpy as np
import pytest
from nibabel.testing import data_path

from umbrella_core.commands import main
from umbrella_core.data.demo import write_demo
from umbrella_core.imaging import save_nifti
from umbrella_core.plugins import get_plugin_manager

ROOT = Path(__file__).resolve().parent.parent
MODALITIES = ("t1", "fmri")


def _record(modality: str, path: str, *, user="<image>\nWhich side?", assistant="left") -> dict:
    turns = [{"role": "user", "content": user}]
    if assistant is not None:
        turns.append({"role": "assistant", "content": assistant})
    return {
        "subject": "sub-bad",
        "images": [{"modality": modality, "path": path}],
        "conversation": turns,
    }


def _append(manifest: Path, line: str) -> int:
    lines = manifest.read_text().splitlines()
    manifest.write_text("\n".join([*lines, line]) + "\n")
    return len(lines) + 1


def _good_t1(study: Path) -> Path:
    return next((study / "t1").glob("*_T1w.nii.gz"))


def _good_bold(study: Path) -> Path:
    return next((study / "fmri").glob("*_bold.nii.gz"))


@attrs.frozen
class Case:
    """One kind of bad input.

    Attributes:
        build: Breaks ``study`` (a copy of the clean one) and returns the
            manifest line it added (None: the whole study is broken).
        says: Fragments the one error must hold (what and what to do);
            ``{study}`` is replaced by the study folder.
        decode: Found only by decoding the voxels (``data.check=full``).
        validate: Checked by ``umbrella validate`` too (it has no tokenizer,
            so it cannot measure sequence lengths).
    """

    build: Callable[[Path, Path], int | None]
    says: tuple[str, ...]
    decode: bool = False


def _missing(study, manifest):
    return _append(manifest, json.dumps(_record("t1", "anat/nope_T1w.nii.gz")))


def _truncated(study, manifest):
    raw = _good_t1(study).read_bytes()
    (study / "truncated_T1w.nii.gz").write_bytes(raw[: len(raw) // 2])
    return _append(manifest, json.dumps(_record("t1", "truncated_T1w.nii.gz")))


def _not_nifti(study, manifest):
    (study / "notes_T1w.nii.gz").write_text("scanner notes, not an image\n")
    return _append(manifest, json.dumps(_record("t1", "notes_T1w.nii.gz")))


def _volume_as_fmri(study, manifest):
    shutil.copy(_good_t1(study), study / "single_bold.nii.gz")
    return _append(manifest, json.dumps(_record("fmri", "single_bold.nii.gz")))


def _short_series(study, manifest):
    series = np.random.default_rng(0).random((24, 24, 24, 4)).astype(np.float32) + 1.0
    save_nifti(study / "short_bold.nii.gz", series, np.eye(4), tr=2.0)
    return _append(manifest, json.dumps(_record("fmri", "short_bold.nii.gz")))


def _nan(study, manifest):
    volume = np.random.default_rng(0).random((16, 16, 16)).astype(np.float32)
    volume[3, 4, 5] = np.inf
    save_nifti(study / "nan_T1w.nii.gz", volume, np.eye(4))
    return _append(manifest, json.dumps(_record("t1", "nan_T1w.nii.gz")))


def _all_zero(study, manifest):
    save_nifti(study / "zero_T1w.nii.gz", np.zeros((16, 16, 16), np.float32), np.eye(4))
    return _append(manifest, json.dumps(_record("t1", "zero_T1w.nii.gz")))


def _singular_affine(study, manifest):
    volume = np.random.default_rng(0).random((16, 16, 16)).astype(np.float32)
    # nibabel refuses to build such an affine: write the sform rows by hand.
    header = nib.Nifti1Header()
    header.set_data_shape(volume.shape)
    header.set_data_dtype(volume.dtype)
    header["sform_code"], header["qform_code"] = 1, 0
    header["srow_x"], header["srow_y"], header["srow_z"] = np.diag([1.0, 1.0, 0.0, 1.0])[:3]
    nib.save(nib.Nifti1Image(volume, None, header), str(study / "flat_T1w.nii.gz"))
    return _append(manifest, json.dumps(_record("t1", "flat_T1w.nii.gz")))


def _empty_manifest(study, manifest):
    manifest.write_text("")
    return None


def _malformed_line(study, manifest):
    return _append(manifest, '{"subject": "sub-bad", "images": [')


def _unknown_modality(study, manifest):
    shutil.copy(_good_t1(study), study / "scan_pet.nii.gz")
    return _append(manifest, json.dumps(_record("pet", "scan_pet.nii.gz")))


def _placeholders(study, manifest):
    path = str(_good_t1(study).relative_to(study))
    return _append(manifest, json.dumps(_record("t1", path, user="<image>\n<image>\nSide?")))


def _no_assistant(study, manifest):
    path = str(_good_t1(study).relative_to(study))
    return _append(manifest, json.dumps(_record("t1", path, assistant=None)))


def _too_long(study, manifest):
    path = str(_good_t1(study).relative_to(study))
    return _append(manifest, json.dumps(_record("t1", path, assistant="left " * 400)))


def _unreadable_folder(study, manifest):
    locked = study / "locked"
    locked.mkdir()
    shutil.copy(_good_t1(study), locked / "sub-x_T1w.nii.gz")
    locked.chmod(0)
    return _append(manifest, json.dumps(_record("t1", "locked/sub-x_T1w.nii.gz")))


def _absolute_outside(study, manifest):
    outside = study.parent / "elsewhere_T1w.nii.gz"
    shutil.copy(_good_t1(study), outside)
    return _append(manifest, json.dumps(_record("t1", str(outside))))


def _dotdot_outside(study, manifest):
    shutil.copy(_good_t1(study), study.parent / "up_T1w.nii.gz")
    return _append(manifest, json.dumps(_record("t1", "../up_T1w.nii.gz")))


def _symlink_outside(study, manifest):
    target = study.parent / "target_T1w.nii.gz"
    shutil.copy(_good_t1(study), target)
    (study / "link_T1w.nii.gz").symlink_to(target)
    return _append(manifest, json.dumps(_record("t1", "link_T1w.nii.gz")))


def _raw_nifti(study, name, shape, dtype, payload=None, **fields):
    """A hand-written NIfTI (header and payload as given): nibabel refuses to write these.

    Gzipped when ``name`` ends in ``.gz``.
    """
    import gzip

    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_sform(np.eye(4), code=1)
    header["vox_offset"] = 352
    for key, value in fields.items():
        header[key] = value
    gzipped = name.endswith(".gz")
    if payload is None:
        payload = bytes(int(np.prod(shape)) * np.dtype(dtype).itemsize)
        payload = gzip.compress(payload) if gzipped else payload
    head = header.binaryblock + bytes(4)
    (study / name).write_bytes((gzip.compress(head) if gzipped else head) + payload)


def _five_d(study, manifest):
    _raw_nifti(study, "five_T1w.nii.gz", (8, 8, 8, 1, 3), np.float32)
    return _append(manifest, json.dumps(_record("t1", "five_T1w.nii.gz")))


def _nifti_pair(study, manifest):
    volume = np.random.default_rng(0).random((16, 16, 16)).astype(np.float32) + 1.0
    nib.save(nib.Nifti1Pair(volume, np.eye(4)), str(study / "pair_T1w.hdr.gz"))
    return _append(manifest, json.dumps(_record("t1", "pair_T1w.hdr.gz")))


def _complex(study, manifest):
    _raw_nifti(study, "complex_T1w.nii.gz", (16, 16, 16), np.complex64)
    return _append(manifest, json.dumps(_record("t1", "complex_T1w.nii.gz")))


def _rgb(study, manifest):
    _raw_nifti(study, "rgb_T1w.nii.gz", (16, 16, 16), np.dtype([(c, "u1") for c in "RGB"]))
    return _append(manifest, json.dumps(_record("t1", "rgb_T1w.nii.gz")))


def _huge_header(study, manifest):
    _raw_nifti(study, "huge_T1w.nii.gz", (4000, 4000, 4000), np.uint8, payload=b"")
    return _append(manifest, json.dumps(_record("t1", "huge_T1w.nii.gz")))


def _gzip_bomb(study, manifest):
    import gzip

    # 1 GiB of zeros in about 1 MB (concatenated gzip members), under a 1024^3 header.
    zeros = gzip.compress(bytes(1 << 24), compresslevel=9) * 64
    _raw_nifti(study, "bomb_T1w.nii.gz", (1024, 1024, 1024), np.uint8, payload=zeros)
    return _append(manifest, json.dumps(_record("t1", "bomb_T1w.nii.gz")))


def _fifo(study, manifest):
    os.mkfifo(study / "pipe_T1w.nii.gz")
    return _append(manifest, json.dumps(_record("t1", "pipe_T1w.nii.gz")))


def _scaled_overflow(study, manifest):
    volume = np.arange(16**3, dtype=np.int16).reshape(16, 16, 16)
    img = nib.Nifti1Image(volume, np.eye(4))
    img.header.set_slope_inter(1e36, 0.0)
    nib.save(img, str(study / "scaled_T1w.nii.gz"))
    return _append(manifest, json.dumps(_record("t1", "scaled_T1w.nii.gz")))


# -- files that are not NIfTI, or not files (issue 12 item 15) ---------------------------


def _dicom_file(study, manifest):
    # nibabel's 0.dcm: its preamble even starts with 348, NIfTI-1's header size.
    shutil.copy(Path(data_path) / "0.dcm", study / "scan_T1w.dcm")
    return _append(manifest, json.dumps(_record("t1", "scan_T1w.dcm")))


def _dicom_folder(study, manifest):
    # As a scanner exports a series: files without a suffix in one folder.
    series = study / "dicom" / "T1_MPRAGE"
    series.mkdir(parents=True)
    for i in range(2):
        shutil.copy(Path(data_path) / f"{i}.dcm", series / f"IM{i:04d}")
    return _append(manifest, json.dumps(_record("t1", "dicom")))


def _symlink_loop(study, manifest):
    (study / "loop_T1w.nii.gz").symlink_to("loop_T1w.nii.gz")
    return _append(manifest, json.dumps(_record("t1", "loop_T1w.nii.gz")))


def _dangling_symlink(study, manifest):
    (study / "moved_T1w.nii.gz").symlink_to("old/moved_T1w.nii.gz")
    return _append(manifest, json.dumps(_record("t1", "moved_T1w.nii.gz")))


def _folder_named_nii_gz(study, manifest):
    (study / "unpacked_T1w.nii.gz").mkdir()
    return _append(manifest, json.dumps(_record("t1", "unpacked_T1w.nii.gz")))


def _folder_of_nifti(study, manifest):
    return _append(manifest, json.dumps(_record("t1", "t1")))


def _empty_file(study, manifest):
    (study / "empty_T1w.nii.gz").write_bytes(b"")
    return _append(manifest, json.dumps(_record("t1", "empty_T1w.nii.gz")))


def _plain_pair(study, manifest):
    volume = np.random.default_rng(0).random((16, 16, 16)).astype(np.float32) + 1.0
    nib.save(nib.Nifti1Pair(volume, np.eye(4)), str(study / "analyze_T1w.img"))
    return _append(manifest, json.dumps(_record("t1", "analyze_T1w.img")))


def _mgz(study, manifest):
    volume = np.random.default_rng(0).random((16, 16, 16)).astype(np.float32) + 1.0
    (study / "freesurfer").mkdir()
    nib.save(nib.MGHImage(volume, np.eye(4)), str(study / "freesurfer" / "T1.mgz"))
    return _append(manifest, json.dumps(_record("t1", "freesurfer/T1.mgz")))


def _png(study, manifest):
    (study / "shot_T1w.nii.gz").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(1024))
    return _append(manifest, json.dumps(_record("t1", "shot_T1w.nii.gz")))


def _gzipped_text(study, manifest):
    import gzip

    (study / "log_T1w.nii.gz").write_bytes(gzip.compress(b"dcm2niix version v1.0\n" * 40))
    return _append(manifest, json.dumps(_record("t1", "log_T1w.nii.gz")))


def _other_suffix(study, manifest):
    path = str(_good_t1(study).relative_to(study))[: -len(".gz")]  # the file is .nii.gz
    return _append(manifest, json.dumps(_record("t1", path)))


# -- damaged headers ---------------------------------------------------------------------


def _nan_affine(study, manifest):
    _raw_nifti(study, "nanaff_T1w.nii.gz", (16, 16, 16), np.float32, srow_x=[np.nan, 0, 0, 0])
    return _append(manifest, json.dumps(_record("t1", "nanaff_T1w.nii.gz")))


def _zero_dim(study, manifest):
    _raw_nifti(study, "flat0_T1w.nii.gz", (16, 16, 16), np.float32, dim=[3, 16, 0, 16, 1, 1, 1, 1])
    return _append(manifest, json.dumps(_record("t1", "flat0_T1w.nii.gz")))


def _negative_dim(study, manifest):
    dim = [3, 16, -16, 16, 1, 1, 1, 1]
    _raw_nifti(study, "negdim_T1w.nii.gz", (16, 16, 16), np.float32, dim=dim)
    return _append(manifest, json.dumps(_record("t1", "negdim_T1w.nii.gz")))


def _sizeof_hdr(study, manifest):
    _raw_nifti(study, "sizeof_T1w.nii.gz", (16, 16, 16), np.float32, sizeof_hdr=349)
    return _append(manifest, json.dumps(_record("t1", "sizeof_T1w.nii.gz")))


def _vox_offset(study, manifest):
    _raw_nifti(study, "offset_T1w.nii", (16, 16, 16), np.float32, vox_offset=1e6)
    return _append(manifest, json.dumps(_record("t1", "offset_T1w.nii")))


def _series_as_t1(study, manifest):
    series = np.random.default_rng(0).random((16, 16, 16, 3)).astype(np.float32) + 1.0
    save_nifti(study / "series_T1w.nii.gz", series, np.eye(4))
    return _append(manifest, json.dumps(_record("t1", "series_T1w.nii.gz")))


# -- fMRI repetition time (issue 12 item 10) ---------------------------------------------


def _tr_in_ms(study, manifest):
    # nibabel's example4d: pixdim[4] 2000 in "sec"; with a target_tr it made a
    # 20-frame series 1,979 frames (37 GB).
    shutil.copy(Path(data_path) / "example4d.nii.gz", study / "example4d_bold.nii.gz")
    return _append(manifest, json.dumps(_record("fmri", "example4d_bold.nii.gz")))


def _sidecar_tr_in_ms(study, manifest):
    shutil.copy(_good_bold(study), study / "ms_bold.nii.gz")
    (study / "ms_bold.json").write_text(json.dumps({"RepetitionTime": 2000}))
    return _append(manifest, json.dumps(_record("fmri", "ms_bold.nii.gz")))


def _bad_sidecar(study, manifest):
    shutil.copy(_good_bold(study), study / "side_bold.nii.gz")
    (study / "side_bold.json").write_text("{RepetitionTime: 2.0}")
    return _append(manifest, json.dumps(_record("fmri", "side_bold.nii.gz")))


OUTSIDE = ("outside the dataset root", "data.allow_outside_root=true")
CASES = {
    "missing-file": Case(_missing, ("anat/nope_T1w.nii.gz: file not found", "check the path")),
    "truncated": Case(
        _truncated, ("truncated_T1w.nii.gz", "truncated or corrupt", "re-export"), decode=True
    ),
    "not-nifti": Case(
        _not_nifti, ("notes_T1w.nii.gz: not a readable NIfTI file: it holds text", "give the")
    ),
    "3d-as-fmri": Case(_volume_as_fmri, ("single_bold.nii.gz: expected a 4D series", "not a")),
    "short-series": Case(
        _short_series, ("short_bold.nii.gz", "fewer than the 8", "use a longer series")
    ),
    "nan-inf": Case(_nan, ("nan_T1w.nii.gz: 1 of 4096 voxels are NaN or infinite",), decode=True),
    "all-zero": Case(_all_zero, ("zero_T1w.nii.gz: all voxels are zero", "re-export"), decode=True),
    "singular-affine": Case(_singular_affine, ("flat_T1w.nii.gz", "singular", "fix the sform")),
    "empty-manifest": Case(_empty_manifest, ("manifest.jsonl: the manifest holds no records",)),
    "malformed-line": Case(_malformed_line, ("invalid JSON", "fix the JSON or remove the line")),
    "unknown-modality": Case(
        _unknown_modality, ("unknown modality 'pet'", "install the plugin that provides it")
    ),
    "placeholders": Case(_placeholders, ("2 <image> placeholder(s)", "1 image(s)", "put one")),
    "no-assistant": Case(_no_assistant, ("no assistant turn", "add the answer")),
    "too-long": Case(_too_long, ("tokens long", "raise model.max_length")),
    "unreadable-folder": Case(_unreadable_folder, ("permission denied on the folder", "chmod")),
    "absolute-outside": Case(_absolute_outside, ("elsewhere_T1w.nii.gz", *OUTSIDE)),
    "dotdot-outside": Case(_dotdot_outside, ("up_T1w.nii.gz", *OUTSIDE)),
    "symlink-outside": Case(_symlink_outside, ("link_T1w.nii.gz", "resolves to", *OUTSIDE)),
    # Header-level (issue 12): caught by data.check=files without decoding a voxel.
    "5d-image": Case(_five_d, ("five_T1w.nii.gz: expected a 3D or 4D image, got a 5D",)),
    "nifti-pair": Case(_nifti_pair, ("pair_T1w.hdr.gz: is part of a NIfTI pair", "convert")),
    "complex64": Case(_complex, ("complex_T1w.nii.gz: holds complex-valued voxels", "magnitude")),
    "rgb": Case(_rgb, ("rgb_T1w.nii.gz: holds colour voxels (RGB)", "grey-scale")),
    "huge-header": Case(_huge_header, ("huge_T1w.nii.gz: the header claims a 4000x4000x4000",)),
    "gzip-bomb": Case(_gzip_bomb, ("bomb_T1w.nii.gz: the header claims a 1024x1024x1024",)),
    "fifo": Case(_fifo, ("pipe_T1w.nii.gz: is a FIFO (named pipe), not a regular file",)),
    "scaled-overflow": Case(_scaled_overflow, ("scaled_T1w.nii.gz: scl_slope 1e+36", "float32")),
    # Not NIfTI, or not a file (issue 12 item 15): said what it is and how to convert it.
    "dicom-file": Case(
        _dicom_file, ("scan_T1w.dcm: not a NIfTI file: it is a DICOM file", "dcm2niix -z y -o")
    ),
    "dicom-folder": Case(
        _dicom_folder, ("dicom: is a folder of DICOM files", "dcm2niix -z y -o OUT_FOLDER")
    ),
    "symlink-loop": Case(_symlink_loop, ("loop_T1w.nii.gz: is a symbolic link that loops",)),
    "dangling-symlink": Case(
        _dangling_symlink,
        ("moved_T1w.nii.gz: is a symbolic link to old/moved_T1w.nii.gz, which does not exist",),
    ),
    "folder-named-nii-gz": Case(
        _folder_named_nii_gz, ("unpacked_T1w.nii.gz: is a folder, expected a NIfTI file",)
    ),
    "folder-of-nifti": Case(
        _folder_of_nifti, ("t1: is a folder, not a NIfTI file; give a file in it, e.g.", "_T1w")
    ),
    "empty-file": Case(_empty_file, ("empty_T1w.nii.gz: the file is empty (0 bytes)", "copy")),
    "plain-pair": Case(_plain_pair, ("analyze_T1w.img: is part of a NIfTI pair", "convert")),
    "mgz": Case(_mgz, ("T1.mgz: not a NIfTI file: it is a FreeSurfer MGH/MGZ", "mri_convert")),
    "png": Case(_png, ("shot_T1w.nii.gz: not a NIfTI file: it is a PNG picture",)),
    "gzipped-text": Case(
        _gzipped_text, ("log_T1w.nii.gz: not a readable NIfTI file: it holds text", "dcm2niix v")
    ),
    "other-suffix": Case(
        _other_suffix, ("_T1w.nii: file not found (there is sub-", "_T1w.nii.gz: is that the one?")
    ),
    # Damaged headers.
    "nan-affine": Case(_nan_affine, ("nanaff_T1w.nii.gz: the affine", "not finite", "sform")),
    "zero-size-dim": Case(
        _zero_dim, ("flat0_T1w.nii.gz: image is empty (a dimension of size 0, shape (16, 0, 16))",)
    ),
    "negative-dim": Case(_negative_dim, ("negdim_T1w.nii.gz:", "dim has a negative size")),
    "sizeof-hdr": Case(_sizeof_hdr, ("sizeof_T1w.nii.gz:", "sizeof_hdr is 349, not 348")),
    "vox-offset-past-end": Case(
        _vox_offset, ("offset_T1w.nii: the header's vox_offset (1,000,000) is past the end",)
    ),
    "series-as-t1": Case(
        _series_as_t1,
        ("series_T1w.nii.gz: expected one 3D", "(3 volumes); split the series"),
        decode=True,
    ),
    # fMRI repetition time (issue 12 item 10), from the header alone.
    "tr-in-ms": Case(
        _tr_in_ms,
        (
            "example4d_bold.nii.gz: the header's repetition time is 2000 s",
            "milliseconds labelled as seconds",
            "data.preprocessing.fmri.max_tr",
        ),
    ),
    "sidecar-tr-in-ms": Case(
        _sidecar_tr_in_ms, ("ms_bold.json: RepetitionTime is 2000, over the 20 s", "in seconds")
    ),
    "bad-sidecar": Case(
        _bad_sidecar, ("side_bold.json: not a valid JSON sidecar", "fix or remove")
    ),
}
STUDY_LEVEL = {"empty-manifest"}


@pytest.fixture(scope="module", autouse=True)
def _umbrella_cache(tmp_path_factory):
    """A scratch UMBRELLA_CACHE: fMRI windows read without the cache save their series'
    statistics there, and these runs must not write to the user's."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("UMBRELLA_CACHE", str(tmp_path_factory.mktemp("umbrella-cache")))
        yield


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """A clean study (2 subjects of t1 and of fmri, demo geometry) and a run config for it."""
    pm = get_plugin_manager()
    specs = {n: pm.resolve_modality(n).item.for_demo() for n in MODALITIES}
    base = tmp_path_factory.mktemp("clean")
    manifest = write_demo(base / "study", specs, subjects=2)
    geometry = {
        n: {"shape": list(s.shape), "patch_size": list(s.patch_size)} for n, s in specs.items()
    }
    config = base / "run.yaml"
    config.write_text(
        json.dumps(  # JSON is YAML
            {
                "model": {"max_length": 512},
                "data": {"modalities": list(MODALITIES), "geometry": geometry},
                "trainer": {
                    "max_steps": 1,
                    "batch_size": 2,
                    "eval_strategy": "no",
                    "generate_samples": 0,
                    "progress": False,
                    "logging_steps": 1,
                },
            }
        )
    )
    return manifest, config


@pytest.fixture(scope="module")
def earlier_run(clean, tmp_path_factory):
    """The output folder of a finished run on the clean study, and its files' hashes."""
    manifest, config = clean
    out = tmp_path_factory.mktemp("earlier") / "run"
    assert _train(config, manifest, out) == 0
    return out, _hashes(out)


def _train(config: Path, study: Path, out: Path, *overrides: str) -> int:
    sets = [x for o in overrides for x in ("--set", o)]
    return main(
        ["train", "--config", str(config), "--study", str(study), "--output-dir", str(out), *sets]
    )


def _hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def broken(request, clean, tmp_path, monkeypatch):
    """A copy of the clean study with one case applied: (case, manifest, line, says)."""
    name = request.param
    case = CASES[name]
    manifest = Path(shutil.copytree(clean[0].parent, tmp_path / "study")) / "manifest.jsonl"
    line = case.build(manifest.parent, manifest)
    if name == "unreadable-folder":
        _deny_locked_folder(manifest.parent / "locked", monkeypatch)
    says = tuple(s.replace("{study}", str(manifest.parent)) for s in case.says)
    yield case, manifest, line, says
    if (manifest.parent / "locked").exists():
        (manifest.parent / "locked").chmod(0o755)


def _deny_locked_folder(locked: Path, monkeypatch) -> None:
    """As a user without permission sees ``chmod 000`` (root ignores it, so simulate)."""
    if os.geteuid() != 0:
        return  # the real chmod applies
    real_access, real_stat, real_open = os.access, os.stat, os.open
    prefix = str(locked)

    def access(path, mode, *args, **kwargs):
        if os.fspath(path) == prefix:
            return False
        return real_access(path, mode, *args, **kwargs)

    def stat(path, *args, **kwargs):
        if isinstance(path, (str, os.PathLike)) and os.fspath(path).startswith(prefix + os.sep):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_stat(path, *args, **kwargs)

    def open_(path, *args, **kwargs):
        if isinstance(path, (str, os.PathLike)) and os.fspath(path).startswith(prefix + os.sep):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)
    monkeypatch.setattr(os, "stat", stat)
    monkeypatch.setattr(os, "open", open_)


def _source(manifest: Path, line: int | None) -> str:
    return f"{manifest}:{line}" if line is not None else str(manifest)


@pytest.mark.parametrize("broken", list(CASES), indirect=True)
def test_validate_reports_one_problem_naming_file_line_and_what_to_do(broken, clean, capsys):
    case, manifest, line, says = broken
    # With the run's config, validate also encodes conversations as the run would.
    assert main(["validate", str(manifest), "--config", str(clean[1])]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    problems = out[:-1]
    assert len(problems) == 1, "\n".join(out)
    if line is not None:  # a record's problem, not the study's
        assert out[-1].endswith(": 1 problem in 1 record"), out[-1]
    assert problems[0].startswith(_source(manifest, line)), problems[0]
    for fragment in says:
        assert fragment in problems[0], problems[0]


@pytest.mark.parametrize("broken", list(CASES), indirect=True)
def test_train_stops_before_step_1_and_keeps_the_earlier_run(
    broken, clean, earlier_run, capsys, monkeypatch
):
    case, manifest, line, says = broken
    out, before = earlier_run
    check = "full" if case.decode else "files"  # files: the default

    def start_model(*args, **kwargs):
        raise AssertionError("the model was built before the records were screened")

    # Screening needs only the tokenizer: a bad record costs no model load.
    monkeypatch.setattr("umbrella_core.model.start.start_model", start_model)
    # --overwrite too: the earlier run goes only once the new run's data is screened.
    assert _train(clean[1], manifest, out, f"data.check={check}", "trainer.overwrite=true") == 2
    error = capsys.readouterr().err
    assert error.startswith("umbrella: error: ") and "Traceback" not in error
    if line is not None:
        assert "1 problem(s) in the data; nothing was trained" in error, error
        assert "data.on_bad=skip" in error
    assert _source(manifest, line) in error
    for fragment in says:
        assert fragment in error, error
    assert _hashes(out) == before  # the earlier run's checkpoint and outputs, byte-identical


def test_an_error_in_a_dataloader_worker_is_one_line(clean, tmp_path, capsys):
    # Truncated data passes the default (header) check and fails when a worker decodes it.
    manifest = Path(shutil.copytree(clean[0].parent, tmp_path / "study")) / "manifest.jsonl"
    CASES["truncated"].build(manifest.parent, manifest)
    out = tmp_path / "out"
    assert _train(clean[1], manifest, out, "data.workers=2", "trainer.max_steps=20") == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("umbrella: error: ") and "\n" not in error, error
    assert "truncated_T1w.nii.gz" in error and "Traceback" not in error and "worker" not in error


def test_skip_trains_without_every_bad_sample_and_counts_them(clean, tmp_path, monkeypatch, capsys):
    manifest = Path(shutil.copytree(clean[0].parent, tmp_path / "study")) / "manifest.jsonl"
    expected = {}
    for name, case in CASES.items():
        if name not in STUDY_LEVEL:
            expected[_source(manifest, case.build(manifest.parent, manifest))] = name
    _deny_locked_folder(manifest.parent / "locked", monkeypatch)
    out = tmp_path / "out"
    try:
        code = _train(clean[1], manifest, out, "data.on_bad=skip", "data.check=full")
    finally:
        (manifest.parent / "locked").chmod(0o755)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"skipping {len(expected)} bad sample(s)" in captured.out
    assert f"skipped {len(expected)} bad sample(s), listed in" in captured.out
    bad = json.loads((out / "bad_samples.json").read_text())
    assert sorted(b["source"] for b in bad) == sorted(expected), bad
    assert (out / "final" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    "broken", ["absolute-outside", "dotdot-outside", "symlink-outside"], indirect=True
)
def test_outside_root_is_accepted_when_the_setting_allows_it(broken, clean, capsys):
    _, manifest, _, _ = broken
    allow = ["--set", "data.allow_outside_root=true"]
    assert main(["validate", str(manifest), "--config", str(clean[1]), *allow]) == 0
    assert "0 problems" in capsys.readouterr().out


def test_a_whole_json_file_that_does_not_parse_names_its_line(tmp_path, capsys):
    manifest = tmp_path / "manifest.json"
    manifest.write_text('[\n  {"subject": "a",\n  "images": []\n  oops\n]\n')
    assert main(["train", "--study", str(manifest), "--output-dir", str(tmp_path / "o")]) == 2
    error = capsys.readouterr().err
    assert f"{manifest}:4: invalid JSON" in error and "fix the JSON" in error


# -- trust: nothing unpickles on load (I7) -------------------------------------------

_PICKLERS = {"pickle", "cPickle", "_pickle", "dill", "joblib", "cloudpickle", "shelve"}


def _unsafe_loads(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        owner = node.func.value.id if isinstance(node.func.value, ast.Name) else ""
        attr = node.func.attr
        keywords = {k.arg: k.value for k in node.keywords}

        def true(key, keywords=keywords):
            value = keywords.get(key)
            return isinstance(value, ast.Constant) and value.value is True

        if owner in _PICKLERS and attr in ("load", "loads", "Unpickler", "open"):
            found.append(f"{path}:{node.lineno}: {owner}.{attr}")
        elif owner == "torch" and attr == "load" and not true("weights_only"):
            found.append(f"{path}:{node.lineno}: torch.load without weights_only=True")
        elif owner in ("np", "numpy") and attr == "load" and "allow_pickle" in keywords:
            if not (
                isinstance(keywords["allow_pickle"], ast.Constant) and not true("allow_pickle")
            ):
                found.append(f"{path}:{node.lineno}: np.load(allow_pickle=...)")
    return found


def test_no_code_unpickles_on_load():
    files = list((ROOT / "umbrella_core").rglob("*.py"))
    files += list((ROOT / "plugins").glob("*/umbrella_*/**/*.py"))
    assert len(files) > 20
    found = [hit for path in files for hit in _unsafe_loads(path)]
    assert not found, "\n".join(found)


def test_the_scan_catches_what_it_is_for(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import pickle, torch, numpy as np\n"
        "pickle.load(f)\n"
        "torch.load(p)\n"
        "torch.load(p, weights_only=False)\n"
        "np.load(p, allow_pickle=True)\n"
        "torch.load(p, weights_only=True)\n"
        "np.load(p)\n"
    )
    assert [hit.split(": ", 1)[0].rsplit(":", 1)[1] for hit in _unsafe_loads(bad)] == [
        "2",
        "3",
        "4",
        "5",
    ]


def test_checkpoints_hold_no_pickled_model_files(earlier_run):
    out, _ = earlier_run
    final = out / "final"
    names = {p.name for p in final.iterdir()}
    assert "model.safetensors" in names and "umbrella.json" in names
    pickled = [p for p in final.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]
    assert not pickled, pickled
