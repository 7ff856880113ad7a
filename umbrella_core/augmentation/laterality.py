"""What augmentation may do to a training record's images (since 0.3): answers that name a
side against transforms that mirror, and the steps a record's ``forbid_augment`` skips.

See :mod:`umbrella_core.augmentation` for what each laterality means.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import attrs

from umbrella_core.augmentation.values import AugmentStep, Pipeline
from umbrella_core.errors import ConfigError, DataError
from umbrella_core.types import StudyRecord, Turn

__all__ = [
    "LATERALITY",
    "check_laterality",
    "check_swapped",
    "effective_laterality",
    "mentions_side",
    "skipped_steps",
    "swap_sides",
    "swapped",
]

LATERALITY = ("refuse", "swap", "ignore")

_SIDE = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def mentions_side(record: StudyRecord) -> str | None:
    """The first turn of ``record`` that names a side (left or right), else None."""
    for turn in record.turns:
        if _SIDE.search(turn.content):
            return turn.content
    return None


def effective_laterality(record: StudyRecord, by_study: Mapping[str, str]) -> str:
    """``refuse``, ``swap`` or ``ignore``: the record's own (its reader knows its task), else
    ``data.laterality.<study>``, else ``refuse`` when a turn names a side."""
    chosen = record.laterality or by_study.get(record.study)
    if chosen is not None:
        return chosen
    return "refuse" if mentions_side(record) is not None else "ignore"


def _swapped(match: re.Match[str]) -> str:
    word = match.group(0)
    other = "right" if word.lower() == "left" else "left"
    if word.isupper():
        return other.upper()
    return other.capitalize() if word[0].isupper() else other


def swap_sides(text: str) -> str:
    """``text`` with left and right swapped (case kept): the answer of a mirrored image."""
    return _SIDE.sub(_swapped, text)


def swapped(record: StudyRecord) -> StudyRecord:
    """``record`` with left and right swapped in every turn: the record of its mirrored images."""
    turns = [Turn(role=t.role, content=swap_sides(t.content)) for t in record.turns]
    return attrs.evolve(record, turns=turns)


def check_laterality(
    pipelines: Mapping[str, Pipeline],
    records: Sequence[StudyRecord],
    by_study: Mapping[str, str],
) -> None:
    """Refuse what would silently change a training record's answer (ConfigError).

    A mirror or turn for a record whose laterality is ``refuse``, a turn for
    one whose laterality is ``swap`` (no rewrite follows a turn), and ``swap``
    for a record with several images of which some could be mirrored (its text
    cannot be both). Steps a record's ``forbid_augment`` names are skipped for
    its images, so they are not held against it.
    """
    for study, value in by_study.items():
        if value not in LATERALITY:
            raise ConfigError(
                f"data.laterality.{study}: expected one of {', '.join(LATERALITY)}, got {value!r}"
            )
    for record in records:
        sided = [s for s in _reaching(pipelines, record) if s.sides != "keep"]
        if not sided:
            continue
        laterality = effective_laterality(record, by_study)
        if laterality == "ignore":
            continue
        step = next((s for s in sided if s.sides == "turn"), sided[0])
        if laterality == "swap" and step.sides == "mirror":
            if len(record.images) == 1:
                continue
            raise ConfigError(
                f"{step.key}: {step.name} mirrors each image on its own, and {_where(record)} "
                "has several: laterality swap cannot rewrite an answer about images mirrored "
                "differently; leave the transform out for such studies"
            )
        what = _what_it_does(step)
        named = mentions_side(record)
        if record.laterality is not None:
            why, fix = f"declares laterality {record.laterality} (its reader's word)", ""
        elif by_study.get(record.study):
            why, fix = f"is in a study set to {laterality} (data.laterality)", ""
        else:
            why = f"names a side ({named[:60]!r})" if named else f"has laterality {laterality}"
            fix = f"set data.laterality.{record.study}: " + (
                "swap to swap left and right in a mirrored sample's turns, or ignore if the "
                "answers do not depend on the side; or "
                if step.sides == "mirror"
                else "ignore if the answers do not depend on the side; or "
            )
        raise ConfigError(
            f"{step.key}: {step.name} {what}, which would change the answer of "
            f"{_where(record)}, which {why}; {fix}leave the transform out"
        )


def check_swapped(
    pipelines: Mapping[str, Pipeline],
    records: Sequence[StudyRecord],
    by_study: Mapping[str, str],
    encode: Callable[[StudyRecord], Any],
) -> None:
    """Refuse a ``swap`` record whose turns, sides swapped, no longer fit the run (ConfigError).

    ``right`` is longer than ``left`` in most tokenizers: a conversation at the
    run's ``model.max_length`` would otherwise fail in a DataLoader worker, the
    first time one of its images comes out mirrored.
    """
    for record in records:
        mirrors = [s for s in _reaching(pipelines, record) if s.sides == "mirror"]
        if not mirrors or effective_laterality(record, by_study) != "swap":
            continue
        twin = swapped(record)
        if twin.turns == record.turns:
            continue
        try:
            encode(twin)
        except DataError as exc:
            raise ConfigError(
                f"{mirrors[0].key}: {mirrors[0].name} mirrors {_where(record)}, whose "
                f"turns with left and right swapped do not fit: {exc}"
            ) from None


def skipped_steps(pipelines: Mapping[str, Pipeline], records: Iterable[StudyRecord]) -> list[str]:
    """One line per modality and step that some records' ``forbid_augment`` skips, counted."""
    counts: dict[tuple[str, str], int] = {}
    for record in records:
        if not record.forbid_augment:
            continue
        skipped = {
            (image.modality, step.name)
            for image in record.images
            for step in _steps_of(pipelines, image.modality)
            if step.forbidden_by(record.forbid_augment)
        }
        for key in skipped:
            counts[key] = counts.get(key, 0) + 1
    return [
        f"{modality}: {name} skipped for the images of {count} training record(s) "
        "that forbid it (forbid_augment)"
        for (modality, name), count in counts.items()
    ]


def _what_it_does(step: AugmentStep) -> str:
    """How ``step`` can change a side, in words: a mirror, a negative scale, a turn."""
    if step.sides == "mirror":
        return "can mirror left and right"
    if _magnitude(step.arguments.get("scale_range")) >= 1.0:
        # MONAI draws each factor as 1 + U(-range, range): from 1 on, it can be negative.
        return (
            "can mirror left and right through a negative scale factor (scale_range of 1 "
            "or more), which no rewrite of an answer follows"
        )
    return "can turn the left-right axis onto another"


def _magnitude(value: Any) -> float:
    """The largest absolute number in a setting (a number or nested sequences of them)."""
    if isinstance(value, bool) or value is None:
        return 0.0
    if isinstance(value, int | float):
        return abs(float(value))
    if isinstance(value, list | tuple):
        return max((_magnitude(v) for v in value), default=0.0)
    return 0.0


def _steps_of(pipelines: Mapping[str, Pipeline], modality: str) -> tuple[AugmentStep, ...]:
    pipeline = pipelines.get(modality)
    return pipeline.steps if pipeline is not None else ()


def _reaching(pipelines: Mapping[str, Pipeline], record: StudyRecord) -> list[AugmentStep]:
    """The steps that touch ``record``'s images: those it forbids are skipped for them."""
    return [
        step
        for image in record.images
        for step in _steps_of(pipelines, image.modality)
        if not step.forbidden_by(record.forbid_augment)
    ]


def _where(record: StudyRecord) -> str:
    return f"study {record.study}'s record {record.source or record.subject}"
