"""Healthy Brain Network (``hbn:PATH``): BIDS, one dataset per site or one in all.

Layout: either ``PATH`` itself is a BIDS dataset (``sub-NDARxxxx/``), or it
holds one BIDS dataset per site (``PATH/RU/sub-*``, ``PATH/CBIC/sub-*``, ...);
every site's images are read with the shared BIDS scanner. In the
one-dataset-per-site layout a scan's site is its site folder's name (``RU``),
unless ``options["site_column"]`` names a phenotype column.

Phenotypes: a CSV in ``PATH`` whose header names ``EID`` (the release
phenotype file) or ``options["phenotypes"]``; otherwise each site's
``participants.tsv``. HBN codes ``Sex`` 0 = male, 1 = female; ``Age`` is in
years. HBN diagnoses live in separate clinician tables and are not mapped
(point ``phenotypes`` at a table with a ``diagnosis`` column to use them).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from umbrella_core.types import StudyRecord
from umbrella_studies.bids import bids_key, study_name
from umbrella_studies.phenotypes import Conventions
from umbrella_studies.scans import Scan, bids_scans, bids_subject_folders
from umbrella_studies.tables import PhenotypeTable, Row, phenotype_file
from umbrella_studies.templates import ErrorHandler, make_records

__all__ = ["read_hbn", "HBN", "bids_roots"]

HBN = Conventions(sex_map={"0": "male", "1": "female", "m": "male", "f": "female"})


def bids_roots(folder: Path) -> list[Path]:
    """``folder`` when it holds ``sub-*`` folders, else its subfolders that do (one per site)."""
    if bids_subject_folders(folder):
        return [folder]
    return sorted(p for p in folder.iterdir() if p.is_dir() and bids_subject_folders(p))


class _Sites:
    """Per-site participants.tsv tables, looked up by subject across sites."""

    def __init__(self, tables: list[PhenotypeTable]) -> None:
        self.tables = tables
        self.path = next((t.path for t in tables if t.path is not None), None)

    def lookup(self, subject: str, session: str | None) -> Row | None:
        return next(
            (row for t in self.tables if (row := t.lookup(subject, session)) is not None), None
        )


def _load(path: Path) -> PhenotypeTable:
    return PhenotypeTable.load(
        path, id_columns=("EID", "participant_id"), key=bids_key, session_columns=("session_id",)
    )


def read_hbn(
    folder: Path, options: Mapping[str, Any], on_error: ErrorHandler | None = None
) -> Iterator[StudyRecord]:
    """The records of an HBN release at ``folder``."""
    roots = bids_roots(folder)
    path = phenotype_file(folder, options, ["*.csv"], header="EID")
    if path is not None:
        table: Any = _load(path)
    else:
        table = _Sites(
            [_load(r / "participants.tsv") for r in roots if (r / "participants.tsv").is_file()]
        )
    dmri_raw = bool(options.get("dmri_raw", True))

    def scans() -> Iterator[Scan]:
        for root in roots:
            yield from bids_scans(root, dmri_raw=dmri_raw, on_error=on_error)

    def site_folder(scan: Scan) -> str | None:
        try:
            return Path(scan.source).relative_to(folder).parts[0]
        except (ValueError, IndexError):
            return None

    return make_records(
        study=study_name(folder, options, "hbn"),
        folder=folder,
        scans=scans(),
        table=table,
        subject_key=bids_key,
        conventions=HBN,
        options=options,
        on_error=on_error,
        site_of=None if roots == [folder] else site_folder,
    )
