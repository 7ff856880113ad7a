"""The built-in study reader for UMBRELLA conversation manifests (JSON and JSONL)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from umbrella_core.data.manifest import find_manifest, read_manifest
from umbrella_core.errors import DataError
from umbrella_core.hookspecs import hookimpl
from umbrella_core.types import StudyRecord


@hookimpl(trylast=True)
def umbrella_study_reader(
    location: str, on_error: Callable[[DataError], None]
) -> Iterable[StudyRecord] | None:
    path = find_manifest(location)
    if path is None:
        return None
    return read_manifest(path, on_error)


@hookimpl
def umbrella_study_kinds() -> list[str]:
    return ["manifest"]
