"""The built-in study reader for the original BrainVLM conversation files (v1 and v2).

It claims ``brainvlm:PATH`` and unprefixed ``.json``/``.jsonl`` files whose first
record is a BrainVLM record (see :mod:`umbrella_core.data.brainvlm`); UMBRELLA
manifests are left to the manifest reader. Both built-ins are ``trylast``, and
pluggy calls the earlier registered of two ``trylast`` implementations first,
so this module comes before the manifest reader in ``DEFAULT_PLUGINS``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs

from umbrella_core.data.brainvlm import find_brainvlm
from umbrella_core.errors import DataError
from umbrella_core.hookspecs import hookimpl
from umbrella_core.types import StudyRecord


@hookimpl(trylast=True)
def umbrella_study_reader(
    location: str, options: Mapping[str, Any], on_error: Callable[[DataError], None]
) -> Iterable[StudyRecord] | None:
    study = find_brainvlm(location)
    if study is None:
        return None
    return attrs.evolve(study, options=dict(options)).records(on_error)


@hookimpl
def umbrella_study_kinds() -> list[str]:
    return ["brainvlm"]
