"""The error hierarchy that the CLI turns into one clear line.

Every error says what is wrong, where (file, line, field) and, where there is
one, what to do about it. The CLI prints ``str(error)`` and exits non-zero;
``--debug`` shows the traceback.
"""

from __future__ import annotations

__all__ = [
    "UmbrellaError",
    "PluginError",
    "DuplicateNameError",
    "ConfigError",
    "DataError",
    "ModelError",
    "TokenCountError",
]


class UmbrellaError(Exception):
    """Base class of every error UMBRELLA raises on purpose."""


class PluginError(UmbrellaError):
    """A plugin failed to load, register or answer a hook correctly."""


class DuplicateNameError(PluginError):
    """Two plugins registered the same name (modality name or alias)."""


class ConfigError(UmbrellaError):
    """A setting is missing, of the wrong type, or names something unknown."""


class DataError(UmbrellaError):
    """A manifest, record or image file cannot be used. The message names the file."""


class ModelError(UmbrellaError):
    """The model cannot be built or loaded as asked."""


class TokenCountError(ModelError):
    """Image placeholders and image features disagree (invariant I3)."""
