"""The ``umbrella serve`` command: a page and an OpenAI-compatible API over a checkpoint.

A built-in plugin's command: the server's own imports wait until it runs.
"""

from __future__ import annotations

import argparse

from umbrella_core.hookspecs import hookimpl
from umbrella_core.types import Command

__all__ = ["SERVE", "umbrella_commands"]


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint", required=True, help="a checkpoint folder (a run's final/ or best/)"
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--api", action="store_true", help="the API only, no page (gradio not needed)")
    p.add_argument(
        "--data-root",
        help="the API may read image files under this folder (paths outside it are refused; "
        "without it, images come base64 only)",
    )
    p.add_argument(
        "--api-key", help="require this key (Authorization: Bearer KEY); or $UMBRELLA_API_KEY"
    )
    p.add_argument(
        "--no-api-key",
        action="store_true",
        help="serve on a --host other than loopback without a key (refused otherwise)",
    )
    p.add_argument("--max-new-tokens", type=int, default=64, help="default answer length in tokens")
    p.add_argument("--max-upload-mb", type=int, default=512, help="largest file accepted")
    p.add_argument(
        "--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"]
    )


def _serve(args: argparse.Namespace) -> int:
    from umbrella_core.serve.server import serve

    return serve(args)


SERVE = Command(
    name="serve",
    help="a web page (three planes, slice sliders, a conversation) and an "
    "OpenAI-compatible API over a checkpoint",
    description=(
        "Serve a checkpoint: the page at / (upload NIfTI files or pick a demo file, look "
        "at them in three planes, ask questions) and /v1/chat/completions, an "
        "OpenAI-compatible API whose image_url parts name a file under --data-root or "
        "carry it base64 in a data: URL."
    ),
    add_arguments=_arguments,
    run=_serve,
)


@hookimpl
def umbrella_commands() -> list[Command]:
    return [SERVE]
