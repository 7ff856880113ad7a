"""The ``umbrella serve`` command: one uvicorn server with the page at ``/`` and the API at ``/v1``.

It binds to 127.0.0.1 unless ``--host`` says otherwise (a checkpoint and the
files under ``--data-root`` are then reachable by whoever reaches the host:
``--api-key`` asks for a key). No usage telemetry leaves the machine:
Gradio's analytics are off, and the page loads nothing from elsewhere (the
theme's fonts ship with Gradio).

(Since 0.3.)
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from umbrella_core.errors import ConfigError

__all__ = ["build_app", "serve"]


def build_app(
    assistant: Any,
    *,
    web: bool = True,
    data_root: str | os.PathLike | None = None,
    api_key: str | None = None,
    max_upload_mb: int = 512,
    max_new_tokens: int = 64,
    scratch: Path | None = None,
) -> Any:
    """The FastAPI app: the API's routes, and the page at ``/`` unless ``web`` is false."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError

    from umbrella_core.serve.api import api_router

    app = FastAPI(title="UMBRELLA", docs_url="/v1/docs", openapi_url="/v1/openapi.json")
    app.add_exception_handler(RequestValidationError, _not_a_request)
    app.include_router(
        api_router(
            assistant,
            data_root=data_root,
            api_key=api_key,
            max_upload_mb=max_upload_mb,
            max_new_tokens=max_new_tokens,
        )
    )
    if not web:
        return app
    # Read when gradio is imported: set before.
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    import gradio as gr

    from umbrella_core.serve.web import THEME_CSS, build_page

    scratch = Path(scratch or tempfile.mkdtemp(prefix="umbrella-serve-"))
    (scratch / "demo").mkdir(parents=True, exist_ok=True)
    (scratch / "uploads").mkdir(parents=True, exist_ok=True)
    blocks = build_page(
        assistant,
        demo_folder=scratch / "demo",
        scratch=scratch / "uploads",
        max_new_tokens=max_new_tokens,
    )
    return gr.mount_gradio_app(
        app,
        blocks,
        path="/",
        footer_links=[],
        css=THEME_CSS,
        max_file_size=f"{max_upload_mb}mb",
        allowed_paths=[str(scratch)],
        ssr_mode=False,
        mcp_server=False,
    )


def _not_a_request(request: Any, error: Exception) -> Any:
    """A body that is not a JSON object: OpenAI's error object, as every other refusal
    (FastAPI's own answer is a 422 ``{"detail": [...]}`` no OpenAI client reads)."""
    from fastapi.responses import JSONResponse

    from umbrella_core.serve.api import ApiError

    problems: list[dict[str, Any]] = list(getattr(error, "errors", lambda: [])())
    said = "; ".join(str(p.get("msg", "")) for p in problems[:3]) or str(error)
    refusal = ApiError(400, f"the request body is not a JSON object ({said})")
    return JSONResponse(refusal.body(), status_code=refusal.status)


def _check_port(host: str, port: int) -> None:
    """Refuse a taken address before the checkpoint is loaded, in one line."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            raise ConfigError(
                f"{host}:{port}: cannot listen there ({error.strerror}); give another --port"
            ) from None


def serve(args: argparse.Namespace) -> int:
    """``umbrella serve``: load the checkpoint, then serve until interrupted."""
    from umbrella_core.plugins import get_plugin_manager

    web = not args.api
    needed = ["fastapi", "uvicorn"] + (["gradio"] if web else [])
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(
            f"umbrella serve needs {', '.join(missing)}: pip install 'umbrella-core[serve]'"
        )
    if args.data_root and not Path(args.data_root).is_dir():
        raise ConfigError(f"--data-root {args.data_root}: not a folder")
    key = args.api_key or os.environ.get("UMBRELLA_API_KEY") or None
    if not key and not args.no_api_key and not _loopback(args.host):
        raise ConfigError(
            f"--host {args.host}: the API would answer anyone who reaches this host, and read "
            "its files under --data-root; give --api-key KEY (or $UMBRELLA_API_KEY), or "
            "--no-api-key to serve without one on purpose"
        )
    _check_port(args.host, args.port)
    import uvicorn

    from umbrella_core.serve.assistant import Assistant

    print(f"loading {args.checkpoint}", flush=True)
    assistant = Assistant.from_checkpoint(args.checkpoint, get_plugin_manager())
    scratch = Path(tempfile.mkdtemp(prefix="umbrella-serve-"))
    try:
        app = build_app(
            assistant,
            web=web,
            data_root=args.data_root,
            api_key=key,
            max_upload_mb=args.max_upload_mb,
            max_new_tokens=args.max_new_tokens,
            scratch=scratch,
        )
        host = f"[{args.host}]" if ":" in args.host else args.host
        base = f"http://{host}:{args.port}"
        if web:
            print(f"page: {base}/", flush=True)
        print(f"api:  {base}/v1  (model {assistant.name!r})", flush=True)
        config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level)
        server = uvicorn.Server(config)
        try:
            server.run()
        except SystemExit:  # uvicorn exits when it cannot bind (taken since the check)
            server.started = False
        if not server.started:
            raise ConfigError(f"{args.host}:{args.port}: cannot listen there; give another --port")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


def _loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine alone (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
