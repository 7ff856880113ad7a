"""Human Connectome Project (``hcp:PATH``): minimally preprocessed per-subject folders.

Layout, one folder per numeric subject id:

* ``t1``: ``T1w/T1w_acpc_dc_restore_brain.nii.gz``, else ``MNINonLinear/T1w_restore_brain.nii.gz``,
  else ``MNINonLinear/T1w.nii.gz``;
* ``fmri``: every resting-state run ``MNINonLinear/Results/rfMRI_*/rfMRI_*.nii.gz``
  (the file named as its folder; task fMRI is not read);
* ``dmri``: ``T1w/Diffusion/dti_FA.nii.gz`` + ``dti_MD.nii.gz`` when a tensor
  fit was run there, else the raw ``T1w/Diffusion/data.nii.gz`` (with ``bvals``
  and ``bvecs`` beside it, not passed on) when ``dmri_raw`` (default true).

Phenotypes: ``options["phenotypes"]`` (a table, or a list of tables), else
every ``*.csv`` whose header names ``Subject`` (the unrestricted behavioural
table and the restricted one), merged by subject; where two name the same
column, the first in name order wins. ``Gender`` is ``M``/``F``; ``Age`` is a
band such as ``26-30``, read as its midpoint (28) and ``36+`` as 36; a
restricted table's ``Age_in_Yrs`` is preferred where present. The restricted
table's ``Family_ID`` groups twins and siblings: a family is kept on one side
of the split the core makes.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from umbrella_core.errors import ConfigError
from umbrella_core.types import ImageRef, StudyRecord
from umbrella_studies.bids import study_name
from umbrella_studies.phenotypes import Conventions, age_from_range
from umbrella_studies.scans import Scan
from umbrella_studies.tables import PhenotypeTable, phenotype_file
from umbrella_studies.templates import ErrorHandler, MergedTables, make_records

__all__ = ["read_hcp", "HCP"]

HCP = Conventions(
    sex_columns=("Gender", "Sex"),
    age_columns=("Age_in_Yrs", "Age"),
    age=age_from_range,
    family_columns=("Family_ID",),
)

_T1 = (
    "T1w/T1w_acpc_dc_restore_brain.nii.gz",
    "MNINonLinear/T1w_restore_brain.nii.gz",
    "MNINonLinear/T1w.nii.gz",
)


def _images(subject: Path, dmri_raw: bool) -> Iterator[ImageRef]:
    t1 = next((subject / n for n in _T1 if (subject / n).is_file()), None)
    if t1 is not None:
        yield ImageRef(modality="t1", paths=[str(t1)])
    for run in sorted((subject / "MNINonLinear/Results").glob("rfMRI_*")):
        path = run / f"{run.name}.nii.gz"
        if path.is_file():
            yield ImageRef(modality="fmri", paths=[str(path)])
    diffusion = subject / "T1w/Diffusion"
    fa, md = diffusion / "dti_FA.nii.gz", diffusion / "dti_MD.nii.gz"
    if fa.is_file() and md.is_file():
        yield ImageRef(modality="dmri", paths=[str(fa), str(md)])
    elif dmri_raw and (diffusion / "data.nii.gz").is_file():
        yield ImageRef(modality="dmri", paths=[str(diffusion / "data.nii.gz")])


def _scans(root: Path, dmri_raw: bool) -> Iterator[Scan]:
    for subject in sorted(p for p in root.iterdir() if p.is_dir() and p.name.isdigit()):
        for image in _images(subject, dmri_raw):
            yield Scan(subject=subject.name, session=None, image=image)


def _tables(folder: Path, options: Mapping[str, Any]) -> list[Path]:
    """``options["phenotypes"]`` (one table or a list), else every CSV naming ``Subject``."""
    given = options.get("phenotypes")
    if given is not None:
        paths = [given] if isinstance(given, str) else given
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise ConfigError(f"phenotypes: expected a path or a list of paths, got {given!r}")
        found = (phenotype_file(folder, {"phenotypes": g}, []) for g in paths)
        return [p for p in found if p is not None]
    return [
        p
        for csv in sorted(folder.glob("*.csv"))
        if (p := phenotype_file(folder, {}, [csv.name], header="Subject")) is not None
    ]


def read_hcp(
    folder: Path, options: Mapping[str, Any], on_error: ErrorHandler | None = None
) -> Iterator[StudyRecord]:
    """The records of an HCP release at ``folder``."""
    tables = [
        PhenotypeTable.load(path, id_columns=("Subject",), key=lambda v: str(v).strip())
        for path in _tables(folder, options)
    ]
    table: Any = PhenotypeTable.empty()
    if len(tables) == 1:
        table = tables[0]
    elif tables:
        table = MergedTables(tables)
    return make_records(
        study=study_name(folder, options, "hcp"),
        folder=folder,
        scans=_scans(folder, bool(options.get("dmri_raw", True))),
        table=table,
        subject_key=str,
        conventions=HCP,
        options=options,
        on_error=on_error,
    )
