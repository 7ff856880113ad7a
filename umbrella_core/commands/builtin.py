"""The core's own commands: train, evaluate, generate, and the data and plugin tools.

``export``, ``serve`` and ``launch`` are built-in plugins of their own packages.
"""

from __future__ import annotations

from umbrella_core.commands.checkpoint import EVALUATE, GENERATE
from umbrella_core.commands.data import CACHE, DEMO_DATA, VALIDATE
from umbrella_core.commands.listing import PLUGINS
from umbrella_core.commands.train import TRAIN
from umbrella_core.hookspecs import hookimpl
from umbrella_core.types import Command

__all__ = ["umbrella_commands"]


@hookimpl
def umbrella_commands() -> list[Command]:
    return [PLUGINS, TRAIN, DEMO_DATA, VALIDATE, CACHE, GENERATE, EVALUATE]
