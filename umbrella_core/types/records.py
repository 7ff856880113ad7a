"""What a study reader gives (``umbrella_study_reader``): records, their images and turns."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from umbrella_core.types._convert import as_tuple, lowered

#: The placeholder that marks where an image goes in a user turn.
IMAGE_PLACEHOLDER = "<image>"


def _paths(value: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> tuple[str, ...]:
    if (type(value) is list or type(value) is tuple) and all(type(v) is str for v in value):
        # A reader's list of strings: the isinstance checks below against the
        # os.PathLike ABC were a tenth of reading a 100,000-record manifest.
        return tuple(value)
    if isinstance(value, (str, os.PathLike)):
        return (os.fspath(value),)
    return tuple(os.fspath(v) for v in value)


@attrs.frozen(kw_only=True)
class ImageRef:
    """One image of a record: its modality name and its file(s), one per channel or one in all."""

    modality: str = attrs.field(converter=lowered)
    paths: tuple[str, ...] = attrs.field(converter=_paths)


_ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}


def _laterality(_: Any, attribute: Any, value: str | None) -> None:
    if value not in (None, "refuse", "swap", "ignore"):
        raise ValueError(f"laterality must be refuse, swap or ignore, got {value!r}")


def _role(value: str) -> str:
    role = _ROLES.get(lowered(value))
    if role is None:
        raise ValueError(f"role must be user or assistant, got {value!r}")
    return role


@attrs.frozen(kw_only=True)
class Turn:
    """One turn of a conversation. ``human``/``gpt`` are accepted as ``user``/``assistant``."""

    role: str = attrs.field(converter=_role)
    content: str = attrs.field(converter=str)


@attrs.frozen(kw_only=True)
class StudyRecord:
    """One training sample as a study reader yields it.

    Attributes:
        subject: Subject identifier.
        images: The images, in the order their placeholders appear in the conversation.
        turns: The conversation; at least one assistant turn.
        study: Name of the study the record comes from.
        session: Session identifier, if any.
        split: ``train``, ``validation`` or ``test``; None when the study gives
            none. Readers leave it None unless the data (a file's field, a
            table's column, a study option) names one; UMBRELLA then assigns
            every record a split when it reads the studies
            (:func:`umbrella_core.data.split.assign_splits`, invariant I10), so
            after ``read_studies`` it is never None.
        family: Family identifier (HCP ``Family_ID``, ABCD ``rel_family_id``),
            if the study knows one: a family's subjects are kept on one side of
            a split.
        site: Acquisition site, if known (``data.split.by: site`` keeps each
            site on one side).
        phenotypes: Phenotype values (age, sex, diagnosis, ...).
        source: Where the record was read (``manifest.jsonl:12``), for error messages.
        laterality: What a left-right mirror of its images does to its answer
            (since 0.3): ``refuse`` (it changes it: such augmentation is a
            config error), ``swap`` (swap left and right in its turns when
            mirrored), ``ignore`` (the answer does not depend on it); None: the
            study's ``data.laterality``, else ``refuse`` when a turn names a side.
        forbid_augment: Augmentations (by name; ``spatial``: every one that
            moves voxels) skipped for its images, because they would change its
            answer (a coordinate, a volume) (since 0.3).

    A record about several subjects (a comparison of two scans) names them
    joined by ``+`` in ``subject`` (``sub-01+sub-02``; :attr:`subjects` splits
    them) and, where it has them, their families and sites in the same order
    in ``family`` and ``site`` (or one value for all). Its subjects are kept
    on one side of a split together.
    """

    subject: str = attrs.field(converter=str)
    images: tuple[ImageRef, ...] = attrs.field(converter=as_tuple)
    turns: tuple[Turn, ...] = attrs.field(converter=as_tuple)
    study: str = "default"
    session: str | None = None
    split: str | None = attrs.field(default=None, converter=attrs.converters.optional(lowered))
    family: str | None = attrs.field(default=None, converter=attrs.converters.optional(str))
    site: str | None = attrs.field(default=None, converter=attrs.converters.optional(str))
    phenotypes: Mapping[str, Any] = attrs.field(factory=dict)
    source: str = ""
    laterality: str | None = attrs.field(default=None, validator=_laterality)
    forbid_augment: tuple[str, ...] = attrs.field(default=(), converter=as_tuple)

    @property
    def subjects(self) -> tuple[str, ...]:
        """The subject ids the record is about (``subject`` split at ``+``)."""
        return tuple(self.subject.split("+"))

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(image.modality for image in self.images)

    @property
    def modality_key(self) -> str:
        """The modalities of the record joined by ``+`` (``t1`` or ``t1+dmri``), for logging."""
        return "+".join(dict.fromkeys(self.modalities)) or "text"
