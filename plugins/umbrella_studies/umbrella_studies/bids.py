"""BIDS datasets: ``bids:PATH``, or a folder holding ``dataset_description.json``.

Layout: ``sub-X[/ses-Y]/{anat,func,dwi}/`` (see :func:`umbrella_studies.scans.bids_scans`).
Phenotypes: ``participants.tsv`` keyed by ``participant_id`` (``sub-01`` or ``01``);
a ``session_id`` column makes rows per session. Study name: ``Name`` from
``dataset_description.json``, else the folder name.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from umbrella_core.types import StudyRecord
from umbrella_studies.phenotypes import Conventions
from umbrella_studies.scans import bids_scans
from umbrella_studies.tables import PhenotypeTable, phenotype_file, read_json
from umbrella_studies.templates import ErrorHandler, make_records

__all__ = ["read_bids", "bids_key", "study_name", "participants"]


def bids_key(subject: Any) -> str:
    """``sub-01`` and ``01`` as one key."""
    text = str(subject).strip()
    return text[4:] if text.startswith("sub-") else text


def _session_key(session: Any) -> str:
    text = str(session).strip()
    return text if text.startswith("ses-") else f"ses-{text}"


def study_name(folder: Path, options: Mapping[str, Any], default: str | None = None) -> str:
    """``options["study"]``, else ``default``, else the BIDS ``Name``, else the folder name."""
    if options.get("study"):
        return str(options["study"])
    if default:
        return default
    description = folder / "dataset_description.json"
    if description.is_file():
        content = read_json(description)
        if isinstance(content, Mapping) and str(content.get("Name", "")).strip():
            return str(content["Name"]).strip()
    return folder.name or "bids"


def participants(folder: Path, options: Mapping[str, Any]) -> PhenotypeTable:
    """``participants.tsv`` (or ``options["phenotypes"]``), or an empty table."""
    path = phenotype_file(folder, options, ["participants.tsv"])
    if path is None:
        return PhenotypeTable.empty()
    return PhenotypeTable.load(
        path,
        id_columns=("participant_id", "subject_id", "subject"),
        key=bids_key,
        session_columns=("session_id",),
        session_key=_session_key,
    )


def read_bids(
    folder: Path, options: Mapping[str, Any], on_error: ErrorHandler | None = None
) -> Iterator[StudyRecord]:
    """The records of the BIDS dataset at ``folder``."""
    return make_records(
        study=study_name(folder, options),
        folder=folder,
        scans=bids_scans(folder, dmri_raw=bool(options.get("dmri_raw", True)), on_error=on_error),
        table=participants(folder, options),
        subject_key=bids_key,
        conventions=Conventions(),
        options=options,
        on_error=on_error,
    )
