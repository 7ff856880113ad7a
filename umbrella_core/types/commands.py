"""A subcommand of ``umbrella`` (``umbrella_commands``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

from umbrella_core.types._convert import lowered


@attrs.frozen(kw_only=True)
class Command:
    """A subcommand of ``umbrella`` (``umbrella_commands``).

    Attributes:
        name: What the user types after ``umbrella`` (``serve``); unique over
            the installed plugins.
        help: One line for ``umbrella --help``.
        add_arguments: ``add_arguments(parser)``: adds the command's arguments to
            its ``argparse.ArgumentParser``.
        run: ``run(args) -> int``: does the work with the parsed
            ``argparse.Namespace``; returns the exit status. An
            :class:`~umbrella_core.errors.UmbrellaError` it raises becomes one line
            on stderr (exit status 2; the traceback with ``umbrella --debug``).
        description: The text of ``umbrella NAME --help`` (default: ``help``).

    Every ``umbrella`` invocation builds every command's parser: import what
    ``run`` needs inside it, not at the plugin module's top.

    Since: 0.6
    """

    name: str = attrs.field(converter=lowered)
    help: str
    add_arguments: Callable[[Any], None] = attrs.field(eq=False, repr=False)
    run: Callable[[Any], int] = attrs.field(eq=False, repr=False)
    description: str | None = None
