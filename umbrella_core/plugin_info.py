"""What ``umbrella plugins`` lists of each plugin (part of :mod:`umbrella_core.plugins`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

from umbrella_core.types import Augmentation, Baseline, Command, LossTerm, MetricFamily

__all__ = ["OFFERS", "PluginInfo"]


@attrs.frozen
class PluginInfo:
    """What ``umbrella plugins`` shows about one plugin: where it is from, what it offers.

    ``description`` is the distribution's Summary, or the first line of the
    plugin module's docstring; ``modalities``, ``study_kinds``, ``loss_terms``
    (with default settings, for every installed modality), ``metrics``,
    ``augmentations`` (since 0.3), ``baselines`` (since 0.4) and ``commands``
    (since 0.6) name what its hooks give.
    """

    name: str
    distribution: str
    version: str
    module: str
    status: str  # "loaded", "broken" or "blocked"
    error: str | None = None
    description: str = ""
    hooks: tuple[str, ...] = ()
    modalities: tuple[str, ...] = ()
    study_kinds: tuple[str, ...] = ()
    loss_terms: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ()
    augmentations: tuple[str, ...] = ()
    baselines: tuple[str, ...] = ()
    commands: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        fields = attrs.asdict(self, recurse=False)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}


#: PluginInfo field -> the hook that names it, the type of the hook's values and their name.
OFFERS: dict[str, tuple[str, type, Callable[[Any], str]]] = {
    "study_kinds": ("umbrella_study_kinds", str, str),
    "loss_terms": ("umbrella_loss_terms", LossTerm, lambda term: term.name),
    "metrics": ("umbrella_metrics", MetricFamily, lambda family: family.name),
    "augmentations": ("umbrella_augmentations", Augmentation, lambda a: a.name),
    "baselines": ("umbrella_baselines", Baseline, lambda b: b.name),
    "commands": ("umbrella_commands", Command, lambda c: c.name),
}
