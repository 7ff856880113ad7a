"""Image files found in a study folder, and the BIDS layout every BIDS-like cohort shares.

A :class:`Scan` is one image of one subject (and session): its modality, its
file(s) and its JSON sidecar. Readers only look at file names and sidecars;
no image is decoded here.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs

from umbrella_core.errors import DataError
from umbrella_core.types import ImageRef
from umbrella_studies.tables import read_json

__all__ = [
    "Scan",
    "NIFTI",
    "nifti_stem",
    "sidecar_beside",
    "bids_sidecar",
    "bids_scans",
    "dmri_maps",
    "bids_subject_folders",
]

NIFTI = (".nii.gz", ".nii")


@attrs.frozen(kw_only=True)
class Scan:
    """One image of one subject.

    Attributes:
        subject: The subject label as the folder names it (``sub-01``, ``1000001``).
        session: The session label (``ses-1``), or None.
        image: Modality and file(s).
        sidecar: The JSON sidecar's content (BIDS inheritance applied), or empty.
    """

    subject: str
    session: str | None
    image: ImageRef
    sidecar: Mapping[str, Any] = attrs.field(factory=dict)

    @property
    def source(self) -> str:
        return self.image.paths[0]


def nifti_stem(path: Path) -> str | None:
    """The name without ``.nii``/``.nii.gz``, or None for other files."""
    for suffix in NIFTI:
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)]
    return None


def sidecar_beside(path: Path) -> dict[str, Any]:
    """The JSON file next to an image with the same stem, if any."""
    stem = nifti_stem(path)
    if stem is None:
        return {}
    candidate = path.with_name(stem + ".json")
    content = read_json(candidate) if candidate.is_file() else {}
    return dict(content) if isinstance(content, Mapping) else {}


def _entities(stem: str) -> tuple[dict[str, str], str]:
    parts = stem.split("_")
    entities = dict(part.split("-", 1) for part in parts[:-1] if "-" in part)
    return entities, parts[-1]


def bids_sidecar(path: Path, root: Path) -> dict[str, Any]:
    """The sidecar of a BIDS image, with the inheritance principle applied.

    JSON files from the dataset root down to the image's folder whose entities
    are a subset of the image's and whose suffix matches are merged, deeper
    files winning, so a top-level ``task-rest_bold.json`` holding the
    RepetitionTime applies to every rest run.
    """
    stem = nifti_stem(path)
    if stem is None:
        return {}
    entities, suffix = _entities(stem)
    folders = [root]
    for part in path.parent.relative_to(root).parts:
        folders.append(folders[-1] / part)
    merged: dict[str, Any] = {}
    for folder in folders:
        for candidate in sorted(folder.glob(f"*_{suffix}.json")) + sorted(
            folder.glob(f"{suffix}.json")
        ):
            other, other_suffix = _entities(candidate.name[: -len(".json")])
            if other_suffix != suffix or any(entities.get(k) != v for k, v in other.items()):
                continue
            content = read_json(candidate)
            if isinstance(content, Mapping):
                merged.update(content)
    return merged


_FA = re.compile(r"(desc-FA_|_FA\.|_FA_|^FA\.|dti_FA)")


def dmri_maps(folders: list[Path]) -> list[tuple[Path, Path]]:
    """FA and MD map pairs in ``folders``: each FA file with its MD twin (same name, FA → MD)."""
    pairs = []
    for folder in folders:
        if not folder.is_dir():
            continue
        for fa in sorted(folder.iterdir()):
            if nifti_stem(fa) is None or not _FA.search(fa.name):
                continue
            md = fa.with_name(_FA.sub(lambda m: m.group(0).replace("FA", "MD"), fa.name, count=1))
            if md.is_file():
                pairs.append((fa, md))
    return pairs


def _images(folder: Path, suffix: str) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if (nifti_stem(p) or "").endswith("_" + suffix))


def bids_subject_folders(root: Path) -> list[Path]:
    """The ``sub-*`` folders directly under ``root``."""
    return sorted(p for p in root.glob("sub-*") if p.is_dir())


def bids_scans(
    root: Path,
    *,
    dmri_raw: bool = True,
    on_error: Callable[[DataError], None] | None = None,
) -> Iterator[Scan]:
    """Every T1w, BOLD and diffusion image of a BIDS(-like) dataset at ``root``.

    * ``t1``: ``sub-X[/ses-Y]/anat/*_T1w.nii[.gz]``;
    * ``fmri``: ``sub-X[/ses-Y]/func/*_bold.nii[.gz]``;
    * ``dmri``: FA and MD maps as two paths, looked for in ``dwi/`` and in
      ``derivatives/<pipeline>/sub-X[/ses-Y]/dwi/`` (``*_desc-FA_*``/``*_FA.*``
      with their ``MD`` twins); without maps, the raw ``*_dwi.nii[.gz]`` as one
      path when ``dmri_raw`` (the dmri plugin expects maps, so such records
      need a plugin or preprocessing that accepts raw DWI).

    A subject folder that cannot be read is reported to ``on_error`` (without
    it: raised) and the other subjects are read.
    """
    for subject_dir in bids_subject_folders(root):
        try:
            # pathlib's glob and is_dir take an unreadable folder for an empty one.
            if not os.access(subject_dir, os.R_OK | os.X_OK):
                raise PermissionError(errno.EACCES, "Permission denied", str(subject_dir))
            scans = list(_subject_scans(root, subject_dir, dmri_raw))
        except OSError as exc:
            error = DataError(
                f"{subject_dir}: cannot read the subject's folder: {exc.strerror or exc}; "
                "fix its permissions (chmod) or remove it",
                source=str(subject_dir),
                field="folder",
            )
            if on_error is None:
                raise error from None
            on_error(error)
            continue
        yield from scans


def _subject_scans(root: Path, subject_dir: Path, dmri_raw: bool) -> Iterator[Scan]:
    sessions = sorted(p for p in subject_dir.glob("ses-*") if p.is_dir()) or [subject_dir]
    for folder in sessions:
        session = folder.name if folder is not subject_dir else None
        for modality, kind, suffix in (("t1", "anat", "T1w"), ("fmri", "func", "bold")):
            for path in _images(folder / kind, suffix):
                yield Scan(
                    subject=subject_dir.name,
                    session=session,
                    image=ImageRef(modality=modality, paths=[str(path)]),
                    sidecar=bids_sidecar(path, root),
                )
        relative = folder.relative_to(root)
        derived = sorted(p / relative / "dwi" for p in (root / "derivatives").glob("*"))
        pairs = dmri_maps([folder / "dwi", *derived])
        if pairs:
            for fa, md in pairs:
                yield Scan(
                    subject=subject_dir.name,
                    session=session,
                    image=ImageRef(modality="dmri", paths=[str(fa), str(md)]),
                    sidecar=sidecar_beside(fa),
                )
        elif dmri_raw:
            for path in _images(folder / "dwi", "dwi"):
                yield Scan(
                    subject=subject_dir.name,
                    session=session,
                    image=ImageRef(modality="dmri", paths=[str(path)]),
                    sidecar=bids_sidecar(path, root),
                )
