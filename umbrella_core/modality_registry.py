"""Home to the modality registry: each modality name and alias, the spec and the plugin behind it.

The plugin host (:mod:`umbrella_core.plugins`) collects what every plugin's
``umbrella_modalities`` returns and builds a :class:`ModalityRegistry` from
it; the registry refuses a name or alias given twice, naming both plugins and
their distributions, and looks modalities up by name or alias,
case-insensitively. It knows nothing of pluggy or entry points.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import attrs

from umbrella_core.errors import DuplicateNameError, PluginError

__all__ = ["Provided", "ModalityRegistry"]


@attrs.frozen
class Provided:
    """A registered item and where it came from."""

    item: Any
    plugin: str
    distribution: str
    version: str


@attrs.frozen
class ModalityRegistry:
    """Modality name → :class:`Provided` spec, and every name and alias → the name.

    Build one with :meth:`from_provided`.
    """

    by_name: dict[str, Provided] = attrs.field(factory=dict)
    names: dict[str, str] = attrs.field(factory=dict)

    @classmethod
    def from_provided(
        cls, provided: Iterable[Provided], *, remedy: str = "uninstall one of them"
    ) -> ModalityRegistry:
        """The registry of ``provided`` specs, in the order given.

        Raises:
            DuplicateNameError: two specs share a name or alias; the message names
                both plugins and distributions and ends with ``remedy``.
        """
        by_name: dict[str, Provided] = {}
        names: dict[str, str] = {}
        for p in provided:
            spec = p.item
            for key in (spec.name, *spec.aliases):
                owner = names.get(key)
                if owner is not None:
                    first = by_name[owner]
                    raise DuplicateNameError(
                        f"modality name {key!r} is registered twice: by plugin "
                        f"{first.plugin!r} (distribution {first.distribution} "
                        f"{first.version}) and by plugin {p.plugin!r} (distribution "
                        f"{p.distribution} {p.version}); {remedy}"
                    )
                names[key] = spec.name
            by_name[spec.name] = p
        return cls(by_name, names)

    def resolve(self, name: str, *, broken: Sequence[str] = ()) -> Provided:
        """The modality called ``name`` (its name or an alias, any case).

        Args:
            name: What the user or a record wrote.
            broken: ``"plugin (distribution): error"`` for each plugin that is
                installed but broken or blocked, named in the error as the likely
                reason the modality is missing.

        Raises:
            PluginError: no installed plugin provides ``name``.
        """
        key = self.names.get(name.strip().lower())
        if key is None:
            known = ", ".join(sorted(self.by_name)) or "none (install a modality plugin)"
            hint = f"; installed but not loaded: {'; '.join(broken)}" if broken else ""
            raise PluginError(
                f"unknown modality {name!r}; installed modalities: {known}; fix the name or "
                f"install the plugin that provides it{hint}"
            )
        return self.by_name[key]
