"""Common phenotype names (``sex``, ``age``, ``diagnosis``) from each cohort's own columns.

Each cohort names and codes these differently (UK Biobank's ``31-0.0`` with
0 = female, ABIDE's ``SEX`` with 2 = female, ABCD's age in months). A
:class:`Conventions` value says how one cohort does it; :func:`common_phenotypes`
turns a raw row into the raw columns plus the three common names, so the
templates only ever see ``sex`` in {male, female}, ``age`` in years and
``diagnosis`` as a word. :func:`family_and_site` reads the columns that keep
subjects together when the core splits the records (ARCHITECTURE I10).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs

from umbrella_core.errors import ConfigError

__all__ = [
    "DEFAULT_SEX_MAP",
    "ABIDE_DX_MAP",
    "Conventions",
    "code_key",
    "common_phenotypes",
    "family_and_site",
    "age_from_range",
]

#: The generic sex coding: M/F words, and 1 = male, 2 = female (the NDA, ABIDE
#: and most BIDS convention). Cohorts coding 0/1 override it.
DEFAULT_SEX_MAP: dict[str, str] = {
    "m": "male",
    "male": "male",
    "man": "male",
    "1": "male",
    "f": "female",
    "female": "female",
    "woman": "female",
    "2": "female",
}

#: ABIDE's ``DX_GROUP`` coding.
ABIDE_DX_MAP: dict[str, str] = {"1": "autism", "2": "control"}


def code_key(value: Any) -> str:
    """A coded cell as a lookup key: ``1``, ``1.0`` and ``" 1 "`` are ``"1"``; words lower-case."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip().lower()


def _years(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) else None


def age_from_range(value: Any) -> float | None:
    """HCP's age bands: ``"26-30"`` is the midpoint 28.0, ``"36+"`` its lower bound 36.0."""
    if isinstance(value, (int, float)):
        return float(value)
    if not isinstance(value, str):
        return None
    band = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*-\s*(\d+(?:\.\d+)?)\s*", value)
    if band:
        return (float(band.group(1)) + float(band.group(2))) / 2
    open_band = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*\+\s*", value)
    return float(open_band.group(1)) if open_band else None


@attrs.frozen(kw_only=True)
class Conventions:
    """How one cohort names and codes sex, age and diagnosis.

    Attributes:
        sex_columns: Candidate sex columns, first present wins.
        sex_map: Coded value (see :func:`code_key`) to ``male``/``female``.
        age_columns: Candidate age columns.
        age: Turns the age cell into years (months / 12 for ABCD, bands for HCP).
        diagnosis_columns: Candidate diagnosis columns.
        diagnosis_maps: Per column (lower-case name), coded value to a word; text
            values of other columns are used as they are, lower-cased.
        family_columns: Candidate family-id columns (ABCD ``rel_family_id``,
            HCP ``Family_ID``): a family's subjects stay on one side of a split.
        site_columns: Candidate acquisition-site columns (ABCD ``site_id_l``,
            ABIDE ``SITE_ID``).
    """

    sex_columns: tuple[str, ...] = ("sex", "gender")
    sex_map: Mapping[str, str] = attrs.field(factory=lambda: dict(DEFAULT_SEX_MAP))
    age_columns: tuple[str, ...] = ("age",)
    age: Callable[[Any], float | None] = _years
    diagnosis_columns: tuple[str, ...] = ("diagnosis", "dx", "dx_group", "group")
    diagnosis_maps: Mapping[str, Mapping[str, str]] = attrs.field(
        factory=lambda: {"dx_group": ABIDE_DX_MAP}
    )
    family_columns: tuple[str, ...] = ()
    site_columns: tuple[str, ...] = ()

    def with_options(self, options: Mapping[str, Any]) -> Conventions:
        """A copy with the user's ``sex_column``/``sex_map``/``site_column``/... options applied."""
        changes: dict[str, Any] = {}
        for name in ("sex", "age", "diagnosis", "family", "site"):
            column = options.get(f"{name}_column")
            if column is not None:
                if not isinstance(column, str):
                    raise ConfigError(f"{name}_column: expected a column name, got {column!r}")
                changes[f"{name}_columns"] = (column,)
        if options.get("sex_map") is not None:
            changes["sex_map"] = _code_map("sex_map", options["sex_map"])
        if options.get("diagnosis_map") is not None:
            mapping = _code_map("diagnosis_map", options["diagnosis_map"])
            columns = changes.get("diagnosis_columns", self.diagnosis_columns)
            changes["diagnosis_maps"] = {c.lower(): mapping for c in columns}
        return attrs.evolve(self, **changes) if changes else self


def _code_map(name: str, value: Any) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{name}: expected a mapping of coded value to word, got {value!r}")
    return {code_key(k): str(v) for k, v in value.items()}


def _column(raw: Mapping[str, Any], candidates: Sequence[str]) -> str | None:
    lowered = {name.lower(): name for name in raw}
    for candidate in candidates:
        if candidate.lower() in lowered:
            return lowered[candidate.lower()]
    return None


def _identifier(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    return text or None


def family_and_site(
    raw: Mapping[str, Any], conventions: Conventions
) -> tuple[str | None, str | None]:
    """The row's family id and site (``1.0`` read as ``1``); None where absent or empty."""
    family = _column(raw, conventions.family_columns)
    site = _column(raw, conventions.site_columns)
    return (
        None if family is None else _identifier(raw[family]),
        None if site is None else _identifier(raw[site]),
    )


def common_phenotypes(raw: Mapping[str, Any], conventions: Conventions) -> dict[str, Any]:
    """The raw columns plus ``sex``, ``age`` and ``diagnosis`` in their common form.

    A common name is set to None when its column exists but its value is missing
    or has no known coding (the task then skips the record and counts it); it is
    absent when the table has no such column. The common names replace raw
    columns of the same name (a raw ``sex`` of ``M`` becomes ``male``).
    """
    phenotypes = dict(raw)
    column = _column(raw, conventions.sex_columns)
    if column is not None:
        value = raw[column]
        phenotypes["sex"] = None if value is None else conventions.sex_map.get(code_key(value))
    column = _column(raw, conventions.age_columns)
    if column is not None:
        phenotypes["age"] = None if raw[column] is None else conventions.age(raw[column])
    column = _column(raw, conventions.diagnosis_columns)
    if column is not None:
        value = raw[column]
        mapping = conventions.diagnosis_maps.get(column.lower())
        if value is None:
            word = None
        elif mapping is not None:
            word = mapping.get(code_key(value))
        elif isinstance(value, str):
            word = value.strip().lower()
        else:
            # A bare number means nothing as an answer without its coding.
            word = None
        phenotypes["diagnosis"] = word
    return phenotypes
