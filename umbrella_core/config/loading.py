"""A run configuration from YAML and ``section.key=value`` overrides, checked against its
attrs classes: unknown keys and wrong types are errors naming the key."""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from umbrella_core.config.files import apply_overrides, read_config_file
from umbrella_core.config.settings import RunConfig, StudyConfig
from umbrella_core.errors import ConfigError

__all__ = ["load_config", "structure"]


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        # An optional setting: null (YAML ``null`` or ``~``) or the other type.
        if value is None:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, key)
    if tp is StudyConfig:
        return StudyConfig.from_value(value, key)
    if attrs.has(tp):
        return structure(tp, value, key)
    if origin in (tuple, list, Sequence):
        if isinstance(value, str):
            value = [v for v in (part.strip() for part in value.split(",")) if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)[:1] or (Any,)
        return tuple(_convert(item, v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is str and isinstance(value, bool):
        # YAML 1.1 reads a bare no/off/false as False: `eval_strategy: no` means "no".
        return "no" if value is False else "yes"
    if tp is str and isinstance(value, (str, int, float)):
        return str(value)
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def structure(cls: type, data: Any, prefix: str = "") -> Any:
    """Build attrs class ``cls`` from a mapping, naming the key of any problem."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in attrs.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown setting {where}{unknown[0]}; known: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _convert(hints[name], value, key)
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{prefix}.{exc}" if prefix else str(exc)) from None


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Defaults, then the YAML file (if any), then ``section.key=value`` overrides."""
    data = read_config_file(path) if path is not None else {}
    data = apply_overrides(data, overrides)
    return structure(RunConfig, data)
