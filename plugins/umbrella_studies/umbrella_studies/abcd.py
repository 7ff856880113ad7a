"""ABCD (``abcd:PATH``): the BIDS-like NDA/ABCC release with NDA phenotype tables.

Layout: ``sub-NDARINVxxxxxxxx/ses-baselineYear1Arm1/{anat,func,dwi}/``, read
with the shared BIDS scanner (``derivatives/*/`` for FA/MD maps).

Phenotypes: the first of ``abcd_p_demo.tsv``, ``abcd_p_demo.csv``,
``participants.tsv`` (or ``options["phenotypes"]``). The subject column is
``src_subject_id`` (``NDAR_INVxxxx``) or ``participant_id``; ids match folders
with ``sub-`` and underscores removed. ``eventname`` (``baseline_year_1_arm_1``)
or ``session_id`` picks the session (``ses-baselineYear1Arm1``), so each session
gets its own age. ``interview_age`` is in months (age = months / 12);
``sex`` is ``M``/``F`` (``demo_sex_v2`` 1 = male, 2 = female also works).
The second row of an NDA download (column descriptions) is skipped.

Families and sites: ``rel_family_id`` (siblings and twins share it) and
``site_id_l``, from the phenotype table or, where present, the longitudinal
tracking table ``abcd_y_lt.tsv``/``.csv`` beside it (merged by subject and
event; the phenotype table wins where both have a column). A family's
subjects are kept on one side of the split the core makes.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from umbrella_core.types import StudyRecord
from umbrella_studies.bids import study_name
from umbrella_studies.phenotypes import Conventions
from umbrella_studies.scans import bids_scans
from umbrella_studies.tables import PhenotypeTable, Row, phenotype_file
from umbrella_studies.templates import ErrorHandler, MergedTables, make_records

__all__ = ["read_abcd", "abcd_key", "event_session", "ABCD"]


def _months(value: Any) -> float | None:
    return value / 12 if isinstance(value, (int, float)) else None


ABCD = Conventions(
    sex_columns=("sex", "demo_sex_v2"),
    age_columns=("interview_age", "age"),
    age=_months,
    family_columns=("rel_family_id",),
    site_columns=("site_id_l",),
)

#: The longitudinal tracking table (ABCD 5.x), where family ids and sites live.
_TRACKING = ["abcd_y_lt.tsv", "abcd_y_lt.csv"]


def abcd_key(subject: Any) -> str:
    """``sub-NDARINV1234``, ``NDAR_INV1234`` and ``NDARINV1234`` as one key."""
    text = str(subject).strip()
    text = text[4:] if text.startswith("sub-") else text
    return text.replace("_", "").upper()


def event_session(event: Any) -> str:
    """NDA ``eventname`` to its session folder.

    ``baseline_year_1_arm_1`` becomes ``ses-baselineYear1Arm1`` (the ABCC naming).
    """
    text = str(event).strip()
    if text.startswith("ses-"):
        return text
    first, *rest = text.split("_")
    return "ses-" + first + "".join(part[:1].upper() + part[1:] for part in rest)


def _description_row(row: Row) -> bool:
    # NDA tables repeat the header as prose in their first data row.
    subject = row.values.get("src_subject_id")
    return isinstance(subject, str) and " " in subject.strip()


def _load(path: Path) -> PhenotypeTable:
    return PhenotypeTable.load(
        path,
        id_columns=("src_subject_id", "participant_id"),
        key=abcd_key,
        session_columns=("eventname", "session_id"),
        session_key=event_session,
        skip_row=_description_row,
    )


def read_abcd(
    folder: Path, options: Mapping[str, Any], on_error: ErrorHandler | None = None
) -> Iterator[StudyRecord]:
    """The records of an ABCD release at ``folder``."""
    path = phenotype_file(
        folder, options, ["abcd_p_demo.tsv", "abcd_p_demo.csv", "participants.tsv"]
    )
    tracking = phenotype_file(folder, {}, _TRACKING)
    tables = [_load(p) for p in (path, tracking) if p is not None]
    if path is not None and tracking is not None and tracking.resolve() == path.resolve():
        tables = tables[:1]
    table: Any = PhenotypeTable.empty()
    if len(tables) == 1:
        table = tables[0]
    elif tables:
        table = MergedTables(tables)
    return make_records(
        study=study_name(folder, options, "abcd"),
        folder=folder,
        scans=bids_scans(folder, dmri_raw=bool(options.get("dmri_raw", True)), on_error=on_error),
        table=table,
        subject_key=abcd_key,
        conventions=ABCD,
        options=options,
        on_error=on_error,
    )
