"""The ``umbrella`` command line, built from the plugins' commands.

:func:`main` asks every installed plugin for its commands (the
``umbrella_commands`` hook) and dispatches to the one named. The core's own
commands are built-in plugins like any other: ``plugins``, ``train``,
``demo-data``, ``validate``, ``cache``, ``generate`` and ``evaluate`` here,
``export``, ``serve`` and ``launch`` in their own packages.
"""

from __future__ import annotations

from umbrella_core.commands.main import build_parser, main

__all__ = ["build_parser", "main"]
