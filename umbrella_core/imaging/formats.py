"""What a file given as an image is when it is not NIfTI, so the error can say what to do.

Part of :mod:`umbrella_core.imaging`. :func:`foreign_format` recognises, from
the first bytes of a file, what users give by mistake: DICOM (the scanner's
format, to convert with dcm2niix), FreeSurfer's MGH/MGZ, pictures (PNG, JPEG,
TIFF, GIF), archives, HDF5, NRRD, PDF, text, and a file gzipped twice.
:func:`folder_message` says what a folder given as an image holds (a DICOM
series, NIfTI files). Both read a bounded number of bytes and never follow
anything that could block (FIFOs, devices).
"""

from __future__ import annotations

import os
import stat

__all__ = ["DCM2NIIX", "foreign_format", "folder_message", "is_dicom"]

#: How to convert a DICOM folder: dcm2niix writes gzipped NIfTI (-z y) with
#: BIDS JSON sidecars (which hold the repetition time) into OUT_FOLDER.
DCM2NIIX = "dcm2niix -z y -o OUT_FOLDER"

# (leading bytes, what the file is, what to do).
_MAGICS: tuple[tuple[bytes, str, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "a PNG picture", "give the NIfTI scan, not a picture of it"),
    (b"\xff\xd8\xff", "a JPEG picture", "give the NIfTI scan, not a picture of it"),
    (b"GIF8", "a GIF picture", "give the NIfTI scan, not a picture of it"),
    (b"II*\x00", "a TIFF picture", "give the NIfTI scan, not a picture of it"),
    (b"MM\x00*", "a TIFF picture", "give the NIfTI scan, not a picture of it"),
    (b"PK\x03\x04", "a ZIP archive", "unpack it and give the NIfTI file inside"),
    (b"\x1f\x8b", "gzip-compressed twice", "decompress it once (gunzip), leaving one .nii.gz"),
    (b"\x89HDF", "an HDF5 file", "export the image as NIfTI (.nii.gz)"),
    (b"NRRD", "a NRRD image", "convert it to NIfTI, e.g. with 3D Slicer or pynrrd"),
    (b"%PDF", "a PDF document", "give the NIfTI scan"),
)
# How many entries of a folder are looked at, and how many files opened.
_FOLDER_ENTRIES = 64
_FOLDER_READS = 8


def is_dicom(head: bytes) -> bool:
    """Whether ``head`` (a file's first bytes) is DICOM: ``DICM`` after a 128-byte preamble."""
    return head[128:132] == b"DICM"


def foreign_format(head: bytes) -> tuple[str, str] | None:
    """``(what the file is, what to do)`` when ``head`` shows a known non-NIfTI format, else None.

    ``head`` is a file's first bytes (inflated, for a gzipped file): at least
    132 to recognise DICOM.
    """
    if is_dicom(head):
        return (
            "a DICOM file",
            f"convert the DICOM series to NIfTI, e.g. {DCM2NIIX} DICOM_FOLDER, "
            "and give the .nii.gz it writes",
        )
    for magic, what, advice in _MAGICS:
        if head.startswith(magic):
            return what, advice
    if _is_mgh(head):
        return (
            "a FreeSurfer MGH/MGZ image",
            "convert it to NIfTI, e.g. mri_convert IN.mgz OUT.nii.gz",
        )
    text = _text(head)
    if text is not None:
        return f"text ({text!r})", "give the image file itself"
    return None


def folder_message(name: str) -> str:
    """What to say about a folder given where a NIfTI file is expected.

    A folder of DICOM files (directly or one level down, as scanners export
    a series) gets the dcm2niix command; a folder holding NIfTI files gets
    one of them as an example.
    """
    dicom, nifti = _look_inside(name, depth=1)
    if dicom:
        return (
            f"{name}: is a folder of DICOM files, not a NIfTI file; convert it to NIfTI, "
            f"e.g. {DCM2NIIX} {name}, and give the .nii.gz file it writes"
        )
    if nifti:
        return f"{name}: is a folder, not a NIfTI file; give a file in it, e.g. {nifti}"
    return f"{name}: is a folder, expected a NIfTI file (.nii or .nii.gz)"


def _is_mgh(head: bytes) -> bool:
    # MGH: big-endian int32 version 1, width, height, depth, frames, type (0, 1, 3 or 4).
    if len(head) < 24 or head[:4] != b"\0\0\0\x01":
        return False
    fields = [int.from_bytes(head[i : i + 4], "big", signed=True) for i in range(4, 24, 4)]
    return all(0 < size < 1 << 16 for size in fields[:4]) and fields[4] in (0, 1, 3, 4)


def _text(head: bytes) -> str | None:
    """The first line of ``head`` (shortened) when it is text, else None."""
    if not head or b"\0" in head:
        return None
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as error:
        if error.start < len(head) - 4:  # not just a character cut at the end
            return None
        text = head[: error.start].decode("utf-8")
    if sum(c.isprintable() or c in "\t\r\n" for c in text) < 0.95 * len(text):
        return None
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line[:40] + ("..." if len(line) > 40 else "")


def _look_inside(folder: str, *, depth: int) -> tuple[bool, str]:
    """(Whether ``folder`` holds DICOM files, the path of a NIfTI file in it or '')."""
    try:
        with os.scandir(folder) as entries:
            listed = [entry for _, entry in zip(range(_FOLDER_ENTRIES), entries, strict=False)]
    except OSError:
        return False, ""
    nifti = ""
    reads = 0
    folders = []
    for entry in sorted(listed, key=lambda e: e.name):
        try:
            if entry.is_dir():
                folders.append(entry.path)
                continue
            if not entry.is_file():
                continue
        except OSError:
            continue
        lowered = entry.name.lower()
        if lowered.endswith((".nii", ".nii.gz")):
            nifti = nifti or entry.path
        elif reads < _FOLDER_READS:
            reads += 1
            if is_dicom(_first_bytes(entry.path, 132)):
                return True, nifti
    if depth > 0 and not nifti:
        for sub in folders[:4]:
            dicom, inner = _look_inside(sub, depth=depth - 1)
            if dicom or inner:
                return dicom, inner
    return False, nifti


def _first_bytes(path: str, count: int) -> bytes:
    """Up to ``count`` bytes of a regular file; empty for anything else or on error."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return b""
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return b""
        return os.read(fd, count)
    except OSError:
        return b""
    finally:
        os.close(fd)
