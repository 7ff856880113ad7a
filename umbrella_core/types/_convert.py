"""Converters the value classes share."""

from __future__ import annotations


def lowered(value: str) -> str:
    return str(value).strip().lower()
