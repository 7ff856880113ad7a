"""pytest fixtures for UMBRELLA plugin authors, registered through the ``pytest11`` entry point.

With ``umbrella-core`` installed, every pytest run has these fixtures (no
conftest needed):

* ``umbrella_conformance``: a :class:`Conformance` whose methods run the
  :mod:`umbrella_core.testing.conformance` checks in the test's ``tmp_path``.
* ``modality_conformance``: ``modality_conformance(spec, plugin=None)`` checks
  one modality (loader, phantom round trip, and the embedder when ``plugin``
  is given).
* ``umbrella_plugin_manager``: a fresh PluginManager with the built-ins only
  (no installed entry points); ``umbrella_plugin_manager_factory(*plugins)``
  registers the given plugin objects in one.
* ``umbrella_cache``: a temporary ``UMBRELLA_CACHE`` folder, so a test never
  writes to the user's cache.

Nothing here is autouse, and importing this module imports neither torch nor
the rest of the kit (pytest loads it in every run of every project in the
environment).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:  # pragma: no cover
    from umbrella_core.plugins import PluginManager
    from umbrella_core.types import ModalitySpec, StudyRecord


class Conformance:
    """The conformance checks bound to a scratch folder (one per test)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self._n = 0

    def _scratch(self, name: str) -> Path:
        self._n += 1
        path = self.folder / f"umbrella-conformance-{self._n}-{name}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def modality_plugin(self, plugin: object, **kwargs: Any) -> list[ModalitySpec]:
        """:func:`~umbrella_core.testing.conformance.check_modality_plugin`."""
        from umbrella_core.testing.conformance import check_modality_plugin

        return check_modality_plugin(plugin, self._scratch("modality-plugin"), **kwargs)

    def modality(
        self,
        spec: ModalitySpec,
        plugin: object | None = None,
        *,
        label_of: Callable[[Any], str] | None = None,
        hidden_size: int = 16,
    ) -> ModalitySpec:
        """One modality at the geometry given: spec metadata, phantom round trip, embedder."""
        from umbrella_core.testing import conformance

        conformance.check_spec(spec)
        if spec.demo is not None and spec.demo.phantom is not None:
            conformance.check_phantom_round_trip(spec, self._scratch(spec.name), label_of=label_of)
        if plugin is not None:
            conformance.check_patch_embedder(plugin, spec, hidden_size=hidden_size)
        return spec

    def registration(self, plugin: object, *, entry_point: str | None = None) -> list[Any]:
        """:func:`~umbrella_core.testing.conformance.check_registration`."""
        from umbrella_core.testing.conformance import check_registration

        return check_registration(plugin, entry_point=entry_point)

    def study_reader(
        self,
        plugin: object,
        location: str,
        *,
        options: Mapping[str, Any] | None = None,
        modalities: Iterable[str] | None = None,
        min_records: int = 1,
        bad_location: str | None = None,
    ) -> list[StudyRecord]:
        """:func:`~umbrella_core.testing.study_conformance.check_study_reader`."""
        from umbrella_core.testing.study_conformance import check_study_reader

        return check_study_reader(
            plugin,
            location,
            self._scratch("foreign"),
            options=options,
            modalities=modalities,
            min_records=min_records,
            bad_location=bad_location,
        )


@pytest.fixture
def umbrella_conformance(tmp_path: Path) -> Conformance:
    """The conformance checks, writing what they need under this test's ``tmp_path``."""
    return Conformance(tmp_path)


@pytest.fixture
def modality_conformance(umbrella_conformance: Conformance) -> Callable[..., Any]:
    """``modality_conformance(spec, plugin=None, label_of=None)``: check one modality."""
    return umbrella_conformance.modality


@pytest.fixture
def umbrella_plugin_manager_factory() -> Callable[..., PluginManager]:
    """``factory(*plugins)``: a fresh manager with the built-ins and ``plugins`` registered."""
    from umbrella_core.testing import fresh_plugin_manager

    return fresh_plugin_manager


@pytest.fixture
def umbrella_plugin_manager(
    umbrella_plugin_manager_factory: Callable[..., PluginManager],
) -> PluginManager:
    """A fresh manager with the built-ins and no installed entry points."""
    return umbrella_plugin_manager_factory()


@pytest.fixture
def umbrella_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A temporary, empty ``UMBRELLA_CACHE`` for this test (its path)."""
    path = tmp_path / "umbrella-cache"
    path.mkdir()
    monkeypatch.setenv("UMBRELLA_CACHE", str(path))
    return path
