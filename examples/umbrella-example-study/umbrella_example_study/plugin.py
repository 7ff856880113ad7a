"""The study reader of ``umbrella-example-study``: ``example:PATH``.

The layout it reads (made up, as small as a real one gets)::

    PATH/
      subjects.csv          subject,label[,split][,modality]
      sub-01_T1w.nii.gz     one image per subject: <subject>_T1w.nii.gz by default
      ...

``label`` is the answer to the question (option ``question``, default the t1
phantom's "Which hemisphere holds the lesion?"); ``split`` is train (default),
validation or test; ``modality`` defaults to ``t1``, and the file to
``<subject>_T1w.nii.gz``, or the ``file`` column when there is one.

Importing this module imports nothing heavy: ``umbrella plugins`` imports it.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from umbrella_core import ConfigError, DataError, StudyRecord, hookimpl
from umbrella_core.types import IMAGE_PLACEHOLDER, ImageRef, Turn

__all__ = [
    "PREFIX",
    "TABLE",
    "OPTIONS",
    "umbrella_study_reader",
    "umbrella_study_kinds",
    "read_example",
]

PREFIX = "example:"
TABLE = "subjects.csv"
OPTIONS = ("question",)
DEFAULT_QUESTION = "Which hemisphere holds the lesion?"


@hookimpl
def umbrella_study_kinds() -> list[str]:
    """The location kind this plugin reads (``example:PATH``), for ``umbrella plugins``."""
    return [PREFIX.rstrip(":")]


@hookimpl
def umbrella_study_reader(
    location: str, options: Mapping[str, Any], on_error: Callable[[DataError], None]
) -> Iterator[StudyRecord] | None:
    """Records of an ``example:PATH`` study; None for any other location."""
    if not location.startswith(PREFIX):
        return None  # not ours: cheap, and never raises
    unknown = sorted(set(options or {}) - set(OPTIONS))
    if unknown:
        raise ConfigError(
            f"{location}: unknown study option {unknown[0]!r}; the example reader takes: "
            f"{', '.join(OPTIONS)}"
        )
    folder = Path(location[len(PREFIX) :]).expanduser().absolute()
    table = folder / TABLE
    if not table.is_file():
        raise DataError(f"{location}: no {TABLE} in {folder}")
    # Read the table now, so a bad row is an error before training, not mid-epoch.
    question = str((options or {}).get("question", DEFAULT_QUESTION))
    return iter(list(read_example(folder, question, on_error)))


def _raise(error: DataError) -> None:
    raise error


def read_example(
    folder: Path,
    question: str = DEFAULT_QUESTION,
    on_error: Callable[[DataError], None] = _raise,
) -> Iterator[StudyRecord]:
    """The records of ``folder/subjects.csv``, one per row; a bad row goes to ``on_error``."""
    table = folder / TABLE
    with table.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = {"subject", "label"} - set(reader.fieldnames or ())
        if missing:
            raise DataError(f"{table}:1: missing column(s) {', '.join(sorted(missing))}")
        for line, row in enumerate(reader, start=2):
            subject = (row.get("subject") or "").strip()
            label = (row.get("label") or "").strip()
            if not subject or not label:
                # Reported with where and which field; the next rows are still read.
                on_error(
                    DataError(
                        f"{table}:{line}: subject and label must not be empty",
                        source=f"{table}:{line}",
                        field="subject" if not subject else "label",
                    )
                )
                continue
            name = (row.get("file") or "").strip() or f"{subject}_T1w.nii.gz"
            yield StudyRecord(
                subject=subject,
                images=[
                    ImageRef(
                        modality=(row.get("modality") or "").strip() or "t1",
                        paths=[str(folder / name)],
                    )
                ],
                turns=[
                    Turn(role="user", content=f"{IMAGE_PLACEHOLDER}\n{question}"),
                    Turn(role="assistant", content=label),
                ],
                study=folder.name,
                split=(row.get("split") or "").strip() or "train",
                phenotypes={"label": label},
                source=f"{table}:{line}",
            )
