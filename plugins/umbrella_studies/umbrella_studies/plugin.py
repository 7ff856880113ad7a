"""The study-reader hook of ``umbrella-studies``.

Recognised locations:

* ``bids:PATH``, ``abcd:PATH``, ``ukb:PATH``, ``hcp:PATH``, ``hbn:PATH``, ``abide:PATH``;
* an unprefixed folder holding ``dataset_description.json`` (read as BIDS),
  unless it also holds ``manifest.json(l)``, which stays the core manifest
  reader's.

Importing this module is cheap: the readers (plain Python, no torch, no
nibabel) are imported when a location is recognised.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from umbrella_core import ConfigError, DataError, StudyRecord, hookimpl
from umbrella_core.data.manifest import MANIFEST_NAMES

__all__ = ["READERS", "OPTIONS", "umbrella_study_reader", "umbrella_study_kinds"]

#: Location prefix to the ``module:function`` reading it.
READERS = {
    "bids": "umbrella_studies.bids:read_bids",
    "abcd": "umbrella_studies.abcd:read_abcd",
    "ukb": "umbrella_studies.ukb:read_ukb",
    "hcp": "umbrella_studies.hcp:read_hcp",
    "hbn": "umbrella_studies.hbn:read_hbn",
    "abide": "umbrella_studies.abide:read_abide",
}


def _kind(location: str) -> tuple[str, Path] | None:
    prefix, sep, rest = location.partition(":")
    if sep and prefix.lower() in READERS:
        return prefix.lower(), Path(rest).expanduser()
    path = Path(location).expanduser()
    try:
        if (
            path.is_dir()
            and (path / "dataset_description.json").is_file()
            and not any((path / name).is_file() for name in MANIFEST_NAMES)
        ):
            return "bids", path
    except OSError:
        # A location that is not a usable path is simply not ours.
        return None
    return None


#: Reader options (README: "Options"), the same for every layout.
OPTIONS = (
    "tasks",
    "split",
    "seed",
    "modalities",
    "sex_column",
    "age_column",
    "diagnosis_column",
    "family_column",
    "site_column",
    "sex_map",
    "diagnosis_map",
    "phenotypes",
    "dmri_raw",
    "study",
    "ukb_t1",
)


@hookimpl
def umbrella_study_reader(
    location: str, options: Mapping[str, Any], on_error: Callable[[DataError], None]
) -> Iterable[StudyRecord] | None:
    """Records of a BIDS or cohort folder, or None when ``location`` is not one of our kinds."""
    found = _kind(location)
    if found is None:
        return None
    kind, folder = found
    unknown = sorted(set(options or {}) - set(OPTIONS))
    if unknown:
        # A misspelt option silently ignored would train on the wrong task.
        raise ConfigError(
            f"{location}: unknown study option {unknown[0]!r}; "
            f"the {kind} reader takes: {', '.join(OPTIONS)}"
        )
    if not folder.is_dir():
        raise DataError(f"{location}: no such folder")
    module_name, _, function = READERS[kind].partition(":")
    reader = getattr(importlib.import_module(module_name), function)
    return reader(folder, dict(options or {}), on_error)


@hookimpl
def umbrella_study_kinds() -> list[str]:
    """The ``KIND:PATH`` prefixes the reader takes, for ``umbrella plugins``."""
    return list(READERS)
