"""``umbrella serve``: a checkpoint behind a web page and an OpenAI-compatible API.

(Since 0.3.)
"""

__all__ = ["add_serve_parser"]


def add_serve_parser(sub):  # type: ignore[no-untyped-def]
    """The ``serve`` subcommand (argparse), added by :func:`umbrella_core.cli.build_parser`."""
    from umbrella_core.serve.server import add_parser

    return add_parser(sub)
