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
    "OutputError",
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
    """A manifest, record or image file cannot be used. The message names the file.

    Args:
        message: What is wrong, as one line a user reads; by convention it
            starts with ``source`` when there is one.
        source: Where: the record's ``StudyRecord.source`` (``FILE:LINE``,
            ``FILE: records[i]``, a table row) or the file at fault; empty
            when the message alone says it.
        field: The field at fault (``subject``, ``images[0].path``,
            ``conversation``); empty when it is the whole record or file.

    ``umbrella validate`` and ``data.on_bad`` read ``source`` and ``field`` as
    they are; nothing parses the message back. (Since 0.3.)
    """

    def __init__(self, message: str, *, source: str = "", field: str = "") -> None:
        super().__init__(message)
        self.source = str(source)
        self.field = str(field)

    @property
    def detail(self) -> str:
        """The message without its leading ``source:``."""
        message = str(self)
        prefix = f"{self.source}: "
        return message[len(prefix) :] if self.source and message.startswith(prefix) else message


class ModelError(UmbrellaError):
    """The model cannot be built or loaded as asked."""


class TokenCountError(ModelError):
    """Image placeholders and image features disagree (invariant I3)."""


class OutputError(UmbrellaError):
    """A run's output folder cannot be written: no room, a quota, read-only, no permission.

    The message names the folder, says what the last complete checkpoint is
    and how to go on. (Since 0.3.)
    """
