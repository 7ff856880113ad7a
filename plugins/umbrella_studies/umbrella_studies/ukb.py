"""UK Biobank (``ukb:PATH``): the imaging pipeline's per-subject folders and a field CSV.

Layout, one folder per subject: ``<eid>/`` (imaging visit, instance 2) or the
bulk-download names ``<eid>_<field>_<instance>_<array>/`` (``1000001_20252_2_0``),
whose folders of one eid and instance are merged into one session
(``<instance>_<array>``):

* ``t1``: ``T1/T1_brain.nii.gz``, else ``T1/T1.nii.gz`` (the brain-extracted
  image first, as UMBRELLA trains on it; ``options["ukb_t1"] = "T1"`` picks the head);
* ``fmri``: ``fMRI/rfMRI.nii.gz``;
* ``dmri``: ``dMRI/dMRI/dti_FA.nii.gz`` + ``dti_MD.nii.gz``, else the TBSS maps
  ``dMRI/TBSS/FA/*FA*.nii.gz`` with their twin in ``dMRI/TBSS/MD/``.

Phenotypes: ``options["phenotypes"]``, else the first ``*.csv`` (or ``*.tsv``)
in the folder whose header names ``eid``. Sex is field 31 (``31-0.0`` or
``p31``; 0 = female, 1 = male); age is field 21003 at the session's instance
(``21003-2.0`` or ``p21003_i2``). Diagnoses are not mapped (use ``column:NAME``).
The site is the assessment centre of the first imaging visit, field 54
(``54-2.0`` or ``p54_i2``), where the table has it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs

from umbrella_core.types import ImageRef, StudyRecord
from umbrella_studies.bids import study_name
from umbrella_studies.phenotypes import Conventions
from umbrella_studies.scans import Scan, sidecar_beside
from umbrella_studies.tables import PhenotypeTable, phenotype_file
from umbrella_studies.templates import ErrorHandler, make_records

__all__ = ["read_ukb", "UKB"]

UKB = Conventions(
    sex_columns=("31-0.0", "p31", "sex"),
    sex_map={"0": "female", "1": "male"},
    site_columns=("54-2.0", "p54_i2"),
)

_FOLDER = re.compile(r"(\d+)(?:_(\d+)_(\d+)_(\d+))?")


def _first(folder: Path, names: list[str]) -> Path | None:
    return next((folder / n for n in names if (folder / n).is_file()), None)


def _images(folder: Path, options: Mapping[str, Any]) -> list[ImageRef]:
    images = []
    t1_names = ["T1/T1_brain.nii.gz", "T1/T1.nii.gz"]
    if options.get("ukb_t1") == "T1":
        t1_names.reverse()
    t1 = _first(folder, t1_names)
    if t1 is not None:
        images.append(ImageRef(modality="t1", paths=[str(t1)]))
    fmri = _first(folder, ["fMRI/rfMRI.nii.gz"])
    if fmri is not None:
        images.append(ImageRef(modality="fmri", paths=[str(fmri)]))
    fa = folder / "dMRI/dMRI/dti_FA.nii.gz"
    if fa.is_file() and (folder / "dMRI/dMRI/dti_MD.nii.gz").is_file():
        images.append(
            ImageRef(modality="dmri", paths=[str(fa), str(fa.with_name("dti_MD.nii.gz"))])
        )
    else:
        for fa in sorted((folder / "dMRI/TBSS/FA").glob("*FA*.nii.gz")):
            md = folder / "dMRI/TBSS/MD" / fa.name.replace("FA", "MD")
            if md.is_file():
                images.append(ImageRef(modality="dmri", paths=[str(fa), str(md)]))
                break
    return images


def _scans(root: Path, options: Mapping[str, Any]) -> Iterator[Scan]:
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        match = _FOLDER.fullmatch(folder.name)
        if match is None:
            continue
        eid, _, instance, array = match.groups()
        session = f"{instance}_{array}" if instance else "2_0"
        for image in _images(folder, options):
            yield Scan(
                subject=eid,
                session=session,
                image=image,
                sidecar=sidecar_beside(Path(image.paths[0])),
            )


@attrs.frozen
class _Table:
    """Looks the age up at the session's instance: field 21003 changes per visit."""

    table: PhenotypeTable

    @property
    def path(self) -> Path | None:
        return self.table.path

    def lookup(self, subject: str, session: str | None) -> Any:
        row = self.table.lookup(subject, None)
        if row is None:
            return None
        instance = (session or "2_0").split("_")[0]
        lowered = {k.lower(): k for k in row.values}
        for name in (f"21003-{instance}.0", f"p21003_i{instance}"):
            if name in lowered:
                return attrs.evolve(row, values={**row.values, "age": row.values[lowered[name]]})
        return row


def read_ukb(
    folder: Path, options: Mapping[str, Any], on_error: ErrorHandler | None = None
) -> Iterator[StudyRecord]:
    """The records of a UK Biobank imaging folder."""
    path = phenotype_file(folder, options, ["*.csv", "*.tsv"], header="eid")
    table = PhenotypeTable.empty()
    if path is not None:
        table = PhenotypeTable.load(path, id_columns=("eid",), key=lambda v: str(v).strip())
    return make_records(
        study=study_name(folder, options, "ukb"),
        folder=folder,
        scans=_scans(folder, options),
        table=_Table(table),  # type: ignore[arg-type]
        subject_key=str,
        conventions=UKB,
        options=options,
        on_error=on_error,
    )
