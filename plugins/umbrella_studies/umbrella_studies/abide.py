"""ABIDE I/II (``abide:PATH``): BIDS, the Preprocessed Connectomes release, or the raw NITRC layout.

Layouts (all that are present are read):

* BIDS, in ``PATH`` or one dataset per site (``PATH/NYU/sub-0051036/...``);
* Preprocessed Connectomes Project: every ``*_func_preproc.nii.gz`` under
  ``PATH`` (``Outputs/cpac/filt_global/func_preproc/Pitt_0050003_func_preproc.nii.gz``)
  as ``fmri``; its anatomical outputs are not read;
* raw NITRC downloads: ``SITE/<SUB_ID>/session_N/anat_N/{mprage,anat}.nii.gz`` as
  ``t1`` and ``.../rest_N/rest.nii.gz`` as ``fmri`` (session ``session_N``).

Subjects are matched by the number in their id (``sub-0050003``, ``Pitt_0050003``
and ``SUB_ID`` 50003 are one subject).

Phenotypes: ``options["phenotypes"]``, else ``Phenotypic_V1_0b_preprocessed1.csv``,
``Phenotypic_V1_0b.csv``, ``ABIDEII_Composite_Phenotypic.csv``, any ``*.csv``
naming ``SUB_ID``, else ``participants.tsv``. ``SEX`` 1 = male, 2 = female;
``AGE_AT_SCAN`` in years; ``DX_GROUP`` 1 = autism, 2 = control; ``-9999`` is missing.
``SITE_ID`` is the site (``data.split.by: site`` keeps each site on one side).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from umbrella_core.types import ImageRef, StudyRecord
from umbrella_studies.bids import study_name
from umbrella_studies.hbn import bids_roots
from umbrella_studies.phenotypes import Conventions
from umbrella_studies.scans import Scan, bids_scans, sidecar_beside
from umbrella_studies.tables import PhenotypeTable, phenotype_file
from umbrella_studies.templates import ErrorHandler, make_records

__all__ = ["read_abide", "abide_key", "ABIDE"]

ABIDE = Conventions(
    sex_columns=("SEX", "sex"),
    age_columns=("AGE_AT_SCAN", "age"),
    diagnosis_columns=("DX_GROUP", "diagnosis", "dx"),
    site_columns=("SITE_ID",),
)

_PREPROC = re.compile(r"(.+?)_(\d+)_func_preproc\.nii\.gz")


def abide_key(subject: Any) -> str:
    """The subject number without leading zeros: ``sub-0050003`` → ``50003``."""
    digits = re.findall(r"\d+", str(subject))
    return str(int(digits[-1])) if digits else str(subject).strip()


def _nitrc(root: Path) -> Iterator[Scan]:
    for session in sorted(root.glob("*/*/session_*")):
        subject = session.parent.name
        if not subject.isdigit():
            continue
        for pattern, modality in (("anat_*/mprage.nii.gz", "t1"), ("anat_*/anat.nii.gz", "t1")):
            for path in sorted(session.glob(pattern)):
                image = ImageRef(modality=modality, paths=[str(path)])
                yield Scan(subject=subject, session=session.name, image=image)
        for path in sorted(session.glob("rest_*/rest.nii.gz")):
            image = ImageRef(modality="fmri", paths=[str(path)])
            yield Scan(subject=subject, session=session.name, image=image)


def _scans(folder: Path, dmri_raw: bool, on_error: ErrorHandler | None) -> Iterator[Scan]:
    for root in bids_roots(folder):
        yield from bids_scans(root, dmri_raw=dmri_raw, on_error=on_error)
    for path in sorted(folder.rglob("*_func_preproc.nii.gz")):
        match = _PREPROC.fullmatch(path.name)
        if match is not None:
            image = ImageRef(modality="fmri", paths=[str(path)])
            yield Scan(
                subject=match.group(2), session=None, image=image, sidecar=sidecar_beside(path)
            )
    yield from _nitrc(folder)


def read_abide(
    folder: Path, options: Mapping[str, Any], on_error: ErrorHandler | None = None
) -> Iterator[StudyRecord]:
    """The records of an ABIDE folder."""
    path = (
        phenotype_file(
            folder,
            options,
            [
                "Phenotypic_V1_0b_preprocessed1.csv",
                "Phenotypic_V1_0b.csv",
                "ABIDEII_Composite_Phenotypic.csv",
            ],
        )
        or phenotype_file(folder, {}, ["*.csv"], header="SUB_ID")
        or phenotype_file(folder, {}, ["participants.tsv"])
    )
    table = PhenotypeTable.empty()
    if path is not None:
        table = PhenotypeTable.load(path, id_columns=("SUB_ID", "participant_id"), key=abide_key)
    return make_records(
        study=study_name(folder, options, "abide"),
        folder=folder,
        scans=_scans(folder, bool(options.get("dmri_raw", True)), on_error),
        table=table,
        subject_key=abide_key,
        conventions=ABIDE,
        options=options,
        on_error=on_error,
    )
