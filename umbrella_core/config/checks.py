"""Validators and converters of run-configuration settings (attrs ``validator=`` / ``converter=``).

Part of :mod:`umbrella_core.config`. Each
validator raises :class:`~umbrella_core.errors.ConfigError` naming the setting;
:func:`umbrella_core.config.structure` puts the section in front of it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import attrs

from umbrella_core.errors import ConfigError

__all__ = [
    "TRACKERS",
    "one_of",
    "tracker_names",
    "known_trackers",
    "positive",
    "not_negative",
    "fraction",
    "seed",
    "not_blank",
    "SEED_RANGE",
    "unit_interval",
    "sampling_weights",
    "BASELINE_MODES",
    "evaluation_settings",
    "known_baselines",
]


def one_of(*options: str) -> Any:
    """A validator refusing any value but ``options``."""

    def check(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value not in options:
            raise ConfigError(
                f"{attribute.name}: expected one of {', '.join(options)}, got {value!r}"
            )

    return check


#: The experiment trackers ``trainer.report_to`` may name (train/trackers.py).
TRACKERS = ("tensorboard", "mlflow", "wandb")


def tracker_names(value: Any) -> tuple[str, ...]:
    """``trainer.report_to`` as a tuple of lower-case tracker names, duplicates dropped."""
    # A comma string (``--set trainer.report_to=tensorboard,mlflow``) or a list;
    # ``none`` (as in transformers) is the empty list.
    if isinstance(value, str):
        value = value.split(",")
    names = (str(v).strip().lower() for v in value)
    return tuple(dict.fromkeys(n for n in names if n and n != "none"))


def known_trackers(instance: Any, attribute: attrs.Attribute, value: tuple[str, ...]) -> None:
    """Refuses a tracker not in :data:`TRACKERS`."""
    for name in value:
        if name not in TRACKERS:
            raise ConfigError(
                f"{attribute.name}: unknown tracker {name!r}; known: {', '.join(TRACKERS)} "
                "(or none)"
            )


def positive(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    """Refuses a value that is not a finite number above 0."""
    # Written so that NaN fails too (every comparison with NaN is false).
    if not (value > 0 and math.isfinite(value)):
        raise ConfigError(f"{attribute.name}: must be a positive number, got {value!r}")


def not_negative(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    """Refuses a value that is not a finite number, 0 or more."""
    if not (value >= 0 and math.isfinite(value)):
        raise ConfigError(f"{attribute.name}: must be 0 or more, got {value!r}")


#: The seeds every library takes: numpy's legacy seeding (which transformers' set_seed
#: calls) refuses anything outside [0, 2**32).
SEED_RANGE = (0, 2**32 - 1)


def seed(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    """Refuses a seed outside :data:`SEED_RANGE`."""
    low, high = SEED_RANGE
    if not low <= value <= high:
        raise ConfigError(
            f"{attribute.name}: expected a whole number from {low} to {high}, got {value!r}"
        )


def not_blank(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    """Refuses an empty or blank string (a path that would mean the working folder)."""
    if not str(value).strip():
        raise ConfigError(f"{attribute.name}: must not be empty")


def fraction(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    """Refuses a value outside [0, 1)."""
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"{attribute.name}: expected a value in [0, 1), got {value!r}")


def unit_interval(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    """Refuses a value outside [0, 1]."""
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{attribute.name}: expected a value in [0, 1], got {value!r}")


def sampling_weights(instance: Any, attribute: attrs.Attribute, value: Mapping[str, Any]) -> None:
    """Refuses a group's sampling weight that is not a finite number, 0 or more."""
    for group, weight in value.items():
        if (
            isinstance(weight, bool)
            or not isinstance(weight, (int, float))
            or not (weight >= 0 and math.isfinite(weight))
        ):
            raise ConfigError(
                f"{attribute.name}.{group}: a sampling weight must be a number, 0 or more, "
                f"got {weight!r}"
            )


#: ``evaluation.baselines``: when the simple baseline beside every figure is fitted.
BASELINE_MODES = ("auto", "on", "off")


def evaluation_settings(value: Mapping[str, Any]) -> dict[str, Any]:
    """The ``evaluation`` section with ``baselines`` as a lower-case word.

    The section is otherwise the metric-family plugins' (``umbrella_metrics``
    settings), so its other keys are theirs to check. YAML 1.1 reads a bare
    ``on``/``off`` as true/false: they mean ``on``/``off`` here.
    """
    out = dict(value)
    if "baselines" in out:
        given = out["baselines"]
        if isinstance(given, bool):
            out["baselines"] = "on" if given else "off"
        elif isinstance(given, str):
            out["baselines"] = given.strip().lower()
    return out


def known_baselines(instance: Any, attribute: attrs.Attribute, value: Mapping[str, Any]) -> None:
    """Refuses an ``evaluation.baselines`` other than :data:`BASELINE_MODES`."""
    mode = value.get("baselines", "auto")
    if mode not in BASELINE_MODES:
        raise ConfigError(
            f"{attribute.name}.baselines: expected one of {', '.join(BASELINE_MODES)}, got {mode!r}"
        )
