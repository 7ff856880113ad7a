"""``umbrella``: the parser built from the plugins' commands, and one line per error.

Errors from UMBRELLA become one line on stderr and exit status 2; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from umbrella_core.errors import UmbrellaError
from umbrella_core.plugins import PluginManager, get_plugin_manager

__all__ = ["main", "build_parser"]


def build_parser(pm: PluginManager | None = None) -> argparse.ArgumentParser:
    """``umbrella`` and a subcommand for each command the plugins of ``pm`` give.

    A plugin whose commands cannot be added is set aside (``umbrella plugins``
    says why); the others' work.
    """
    pm = pm if pm is not None else get_plugin_manager()
    parser = argparse.ArgumentParser(
        prog="umbrella",
        description="Train LLaVA-style vision-language models on brain MRI.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    for provided in pm.commands():
        command = provided.item
        p = sub.add_parser(
            command.name, help=command.help, description=command.description or command.help
        )
        command.add_arguments(p)
        p.set_defaults(func=command.run)
    return parser


def _one_line(exc: BaseException) -> str:
    """The error's message; for one re-raised from a DataLoader worker, the original line.

    torch re-raises a worker's error as ``Caught DataError in DataLoader worker
    process 0. Original Traceback ...``: the user's line is the last one.
    """
    message = str(exc)
    if "\nOriginal Traceback" not in message:
        return message
    kind = type(exc)
    for prefix in (f"{kind.__module__}.{kind.__qualname__}: ", f"{kind.__name__}: "):
        at = message.rfind(prefix)
        if at >= 0:
            return message[at + len(prefix) :].strip()
    return message.rstrip().splitlines()[-1]


def _quiet_library_notices() -> None:
    """Keep notices a user can do nothing about off every run's output.

    DeepSpeed (imported by transformers' Trainer when installed) logs
    ``Setting accelerator to CPU`` at WARNING on each start without a GPU.
    """
    import logging

    deepspeed = logging.getLogger("DeepSpeed")
    if not any(getattr(f, "umbrella", False) for f in deepspeed.filters):

        def no_cpu_notice(record: logging.LogRecord) -> bool:
            return not str(record.msg).startswith("Setting accelerator to CPU")

        no_cpu_notice.umbrella = True  # type: ignore[attr-defined]
        deepspeed.addFilter(no_cpu_notice)


def _end_progress_bars() -> None:
    """End the line of a progress bar the error interrupted: the error gets a line of its own."""
    tqdm = sys.modules.get("tqdm")
    # Closing a bar ends its line (or clears it, for one that does not stay).
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ()) or ()):
        bar.close()


def _debug(argv: Sequence[str]) -> bool:
    """``umbrella --debug COMMAND ...``: among the options before the command."""
    for token in argv:
        if token == "--debug":
            return True
        if not token.startswith("-"):
            return False
    return False


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        # Building the parser loads the plugins: a bad UMBRELLA_BLOCK_PLUGINS is one line too.
        args = build_parser(get_plugin_manager()).parse_args(argv)
        _quiet_library_notices()
        return int(args.func(args) or 0)
    except UmbrellaError as exc:
        if _debug(argv):
            raise
        _end_progress_bars()
        print(f"umbrella: error: {_one_line(exc)}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)  # TrainingInterrupted: 128 + signal number
    except KeyboardInterrupt:
        print("umbrella: interrupted", file=sys.stderr)
        return 130
