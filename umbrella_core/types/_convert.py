"""Converters the value classes share."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def lowered(value: str) -> str:
    return str(value).strip().lower()


def as_tuple(values: Iterable[Any]) -> tuple[Any, ...]:
    """``tuple(values)``, for ``attrs.field(converter=...)``.

    A named function, not ``tuple`` itself: mypy's attrs plugin types an
    ``__init__`` argument converted by a generic class as ``Iterable[_T_co]``,
    which no argument matches.
    """
    return tuple(values)
