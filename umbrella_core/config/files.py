"""The YAML side of the run configuration: config files and ``section.key=value`` overrides.

Part of :mod:`umbrella_core.config`: :func:`~umbrella_core.config.load_config`
reads a file with :func:`read_config_file`, applies the overrides with
:func:`apply_overrides`, then checks every value's type.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from umbrella_core.errors import ConfigError

__all__ = ["read_config_file", "apply_overrides"]


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, line: int, first: int) -> None:
        super().__init__(f"{line}: key {key!r} appears twice (also on line {first}); keep one")
        self.line = line


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a mapping that names a key twice.

    PyYAML keeps the last value silently, so a setting written twice (the
    second copy forgotten further down) would change a run unnoticed.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if isinstance(key, str | int | float | bool) and key in seen:
                raise _DuplicateKey(key, line, seen[key])
            if isinstance(key, str | int | float | bool):
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


# YAML 1.1 (PyYAML's) reads 1e-5 and 1e30 as strings: only 1.0e-5 is a float there. A
# setting written so would reach a transform or an optimizer as text; read it as YAML
# 1.2 and every other tool does, a number.
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The sections of a YAML config file, as a dict (values not checked yet).

    Raises:
        ConfigError: The file cannot be read, is not YAML, names a key twice in
            one mapping, or is not a mapping at the top level.
    """
    try:
        loaded = _yaml(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror or exc}") from None
    except _DuplicateKey as exc:
        raise ConfigError(f"{path}:{exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    if loaded is not None and not isinstance(loaded, Mapping):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return dict(loaded or {})


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings (values parsed as YAML) to a nested dict."""
    out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in data.items()}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected section.key=value")
        dotted, raw = item.split("=", 1)
        parts = dotted.strip().split(".")
        try:
            value = _yaml(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = value
    return out
