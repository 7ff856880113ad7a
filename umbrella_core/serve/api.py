"""An OpenAI-compatible chat API over a checkpoint: ``/v1/chat/completions``, ``/v1/models``.

Existing OpenAI clients call it as they call any such server. An image is an
``image_url`` content part whose ``url`` is one of:

* a NIfTI file on the server, as a path (``sub-01_T1w.nii.gz``, relative to
  ``--data-root``) or a ``file://`` URL; several files of one image (FA and
  MD maps) joined by commas, as ``umbrella generate --image`` takes them.
  Paths resolve (symbolic links too) inside ``--data-root`` or are refused;
  without ``--data-root`` no path is read.
* the file itself, base64 in a data URL: ``data:application/gzip;name=sub-01_T1w.nii.gz;base64,...``
  (the ``name`` parameter lets the modality be told from the file name).

``image_url`` may also say ``"modality": "t1"`` (else it is told from the
file name, as ``umbrella generate`` does) and ``"urls": [...]`` for a
several-file image given as data URLs. Images are placed where their parts
are in the messages. Decoding is greedy (the answer a checkpoint is
evaluated with): ``temperature`` and ``top_p`` are accepted and do not change
it; ``n`` must be 1. ``stream: true`` sends server-sent events as tokens are
decoded.

Errors are OpenAI's shape (``{"error": {"message", "type", "param", "code"}}``)
with the one line the CLI would print.

(Since 0.3.)
"""
# No "from __future__ import annotations": FastAPI reads the route functions' annotations
# (Request) as objects.

import base64
import binascii
import json
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from umbrella_core.errors import UmbrellaError
from umbrella_core.types import IMAGE_PLACEHOLDER, Turn

__all__ = ["api_router", "ApiError", "parse_messages"]

#: Most new tokens one request may ask for.
MAX_TOKENS = 1024
#: Longest file path a request may name (Linux's PATH_MAX).
MAX_PATH = 4096
#: Image decodings at once, over all requests: each holds a volume's voxels (and a
#: gzip's inflation) in memory, so memory is bounded by this many, not by the clients.
DECODING_AT_ONCE = 2
#: Seconds a request waits for a decoding slot before it is told the server is busy.
DECODING_WAIT = 120


class ApiError(Exception):
    """A request the API refuses: the HTTP status and OpenAI's error fields."""

    def __init__(
        self, status: int, message: str, *, kind: str = "invalid_request_error", param: str = ""
    ) -> None:
        super().__init__(message)
        self.status, self.kind, self.param = status, kind, param

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": str(self),
                "type": self.kind,
                "param": self.param or None,
                "code": None,
            }
        }


def _text(content: Any, where: str) -> str:
    if not isinstance(content, str):
        raise ApiError(400, f"{where}: expected text", param=where)
    return content


class _Images:
    """Resolves image parts to files on the server; data URLs are written to a scratch folder."""

    def __init__(self, data_root: Path | None, max_bytes: int) -> None:
        self.data_root = data_root.resolve() if data_root else None
        self.max_bytes = max_bytes
        self.scratch: Path | None = None

    def close(self) -> None:
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)

    def path(self, url: str, where: str) -> str:
        if self.data_root is None:
            raise ApiError(
                403,
                f"{where}: {url}: this server reads no files of its own; send the file "
                "base64 in a data: URL, or start it with --data-root DIR",
                kind="permission_error",
                param=where,
            )
        text = unquote(urlsplit(url).path) if url.startswith("file://") else url
        shown = text if len(text) <= 200 else f"{text[:200]}..."
        if "\x00" in text or len(text) > MAX_PATH or any(len(n) > 255 for n in text.split("/")):
            raise ApiError(
                400,
                f"{where}: not a file path (a NUL byte, a name over 255 characters, or over "
                f"{MAX_PATH} in all)",
                param=where,
            )
        try:
            path = Path(text).expanduser()
            full = (path if path.is_absolute() else self.data_root / path).resolve()
        except (OSError, RuntimeError, ValueError) as exc:  # a name too long, a link loop
            raise ApiError(
                400, f"{where}: {shown}: not a usable path ({exc})", param=where
            ) from None
        if not full.is_relative_to(self.data_root):
            raise ApiError(
                403,
                f"{where}: {shown}: outside the data root {self.data_root}",
                kind="permission_error",
                param=where,
            )
        if full.exists() and not full.is_file():
            kind = "a folder" if full.is_dir() else "not a regular file (a pipe or device)"
            raise ApiError(400, f"{where}: {shown}: {kind}, not an image file", param=where)
        return str(full)

    def data(self, url: str, where: str, index: int) -> str:
        header, comma, payload = url.partition(",")
        if not comma or not header.endswith(";base64"):
            raise ApiError(400, f"{where}: a data: URL must be base64 (data:...;base64,...)")
        params = dict(p.split("=", 1) for p in header[len("data:") :].split(";")[1:-1] if "=" in p)
        if len(payload) * 3 // 4 > self.max_bytes:
            raise ApiError(
                413, f"{where}: the file is over {self.max_bytes // 2**20} MiB", param=where
            )
        try:
            raw = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(
                400, f"{where}: the data: URL is not valid base64", param=where
            ) from None
        name = os.path.basename(unquote(params.get("name", "")))
        if not re.fullmatch(r"[\w.+-]{1,200}", name or "-") or name.startswith("."):
            raise ApiError(400, f"{where}: name={name!r} is not a plain file name", param=where)
        if not name:
            # Without a name the modality must be given; the suffix tells nibabel the format.
            name = f"image-{index}.nii.gz" if raw[:2] == b"\x1f\x8b" else f"image-{index}.nii"
        if self.scratch is None:
            self.scratch = Path(tempfile.mkdtemp(prefix="umbrella-api-"))
        folder = self.scratch / str(index)
        folder.mkdir()
        (folder / name).write_bytes(raw)
        return str(folder / name)

    def files(self, part: Mapping[str, Any], where: str, index: int) -> tuple[list[str], str]:
        spec = part.get("image_url")
        if isinstance(spec, str):
            spec = {"url": spec}
        if not isinstance(spec, Mapping):
            raise ApiError(400, f"{where}.image_url: expected an object with a url", param=where)
        urls = spec.get("urls") or [spec.get("url")]
        if not isinstance(urls, list) or not all(isinstance(u, str) and u for u in urls):
            raise ApiError(400, f"{where}.image_url.url: expected a file path or data URL")
        files: list[str] = []
        for url in urls:
            if url.startswith("data:"):
                files.append(self.data(url, where, index * 16 + len(files)))
            elif re.match(r"[a-z][a-z0-9+.-]*://", url) and not url.startswith("file://"):
                raise ApiError(
                    400,
                    f"{where}: {url.split('://')[0]} URLs are not fetched: give a file path "
                    "on the server or a data: URL",
                    param=where,
                )
            else:
                files += [self.path(u.strip(), where) for u in url.split(",") if u.strip()]
        modality = spec.get("modality") or ""
        if not isinstance(modality, str):
            raise ApiError(400, f"{where}.image_url.modality: expected a modality name")
        return files, modality


def parse_messages(
    messages: Any, images: _Images
) -> tuple[list[Turn], list[tuple[list[str], str]], str | None]:
    """OpenAI messages as turns (``<image>`` where images are), the images, the system text."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages: expected a non-empty list", param="messages")
    turns: list[Turn] = []
    found: list[tuple[list[str], str]] = []
    system: list[str] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, Mapping):
            raise ApiError(400, f"{where}: expected an object", param=where)
        role = message.get("role")
        content = message.get("content")
        if role in ("system", "developer"):
            system.append(_content_text(content, where))
            continue
        if role not in ("user", "assistant"):
            raise ApiError(400, f"{where}.role: {role!r} is not user, assistant or system")
        if isinstance(content, str):
            if role == "user" and IMAGE_PLACEHOLDER in content:
                raise ApiError(
                    400, f"{where}: {IMAGE_PLACEHOLDER} in text: send images as image_url parts"
                )
            turns.append(Turn(role=role, content=content))
            continue
        if not isinstance(content, list):
            raise ApiError(400, f"{where}.content: expected text or a list of parts")
        pieces: list[str] = []
        for j, part in enumerate(content):
            at = f"{where}.content[{j}]"
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind == "text":
                pieces.append(_text(part.get("text"), at))
            elif kind == "image_url" and role == "user":
                found.append(images.files(part, at, len(found)))
                pieces.append(IMAGE_PLACEHOLDER + "\n")
            else:
                raise ApiError(400, f"{at}: unsupported content part {kind!r}", param=at)
        turns.append(Turn(role=role, content="".join(pieces)))
    return turns, found, "\n\n".join(system) if system else None


def _content_text(content: Any, where: str) -> str:
    if isinstance(content, list):
        return "".join(
            _text(p.get("text") if isinstance(p, Mapping) else None, where) for p in content
        )
    return _text(content, where)


def _int(body: Mapping[str, Any], names: tuple[str, ...], default: int) -> int:
    for name in names:
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_TOKENS:
            raise ApiError(
                400, f"{name}: expected a whole number from 1 to {MAX_TOKENS}", param=name
            )
        return value
    return default


def api_router(
    assistant: Any,
    *,
    data_root: str | os.PathLike | None = None,
    api_key: str | None = None,
    max_upload_mb: int = 512,
    max_new_tokens: int = 64,
) -> Any:
    """The API's routes (a FastAPI ``APIRouter``) over an assistant (serve/assistant.py)."""
    from fastapi import APIRouter, Request
    from fastapi.responses import JSONResponse, StreamingResponse

    router = APIRouter()
    root = Path(data_root).expanduser() if data_root else None
    created = int(time.time())
    decoding = threading.BoundedSemaphore(DECODING_AT_ONCE)

    def refuse(error: ApiError) -> Any:
        return JSONResponse(error.body(), status_code=error.status)

    def authorised(request: Request) -> bool:
        if not api_key:
            return True
        return request.headers.get("authorization", "") == f"Bearer {api_key}"

    denied = ApiError(
        401, "a valid API key is needed (Authorization: Bearer KEY)", kind="authentication_error"
    )

    @router.get("/v1/models")
    def models(request: Request) -> Any:
        if not authorised(request):
            return refuse(denied)
        return _model_list(assistant.name, created)

    @router.post("/v1/chat/completions")
    def chat_completions(request: Request, body: dict[str, Any]) -> Any:
        if not authorised(request):
            return refuse(denied)
        images = _Images(root, max_upload_mb * 2**20)
        try:
            reply = _start_reply(assistant, body, images, max_new_tokens, decoding)
        except ApiError as error:
            images.close()
            return refuse(error)
        except UmbrellaError as error:
            images.close()
            return refuse(ApiError(400, _one_line(error, images)))
        except BaseException:
            images.close()
            raise
        ident = f"chatcmpl-{uuid.uuid4().hex}"
        if body.get("stream"):
            usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(
                _events(reply, ident, assistant.name, usage, images), media_type="text/event-stream"
            )
        return _completion(reply, ident, assistant.name, images)

    @router.get("/health")
    def health(request: Request) -> Any:
        if not authorised(request):
            return refuse(denied)
        return {"status": "ok", "model": assistant.name, "modalities": sorted(assistant.specs)}

    return router


def _model_list(name: str, created: int) -> dict[str, Any]:
    """``/v1/models``: the one model served, as OpenAI lists models."""
    return {
        "object": "list",
        "data": [{"id": name, "object": "model", "created": created, "owned_by": "umbrella"}],
    }


def _start_reply(
    assistant: Any,
    body: Mapping[str, Any],
    images: _Images,
    max_new_tokens: int,
    decoding: threading.BoundedSemaphore,
) -> Any:
    """Check a chat request and start the assistant's reply (text pieces, as decoded).

    Raises:
        ApiError: The request names another model, asks for more than one
            choice or too many tokens, or its messages are refused.
        UmbrellaError: An image cannot be read, or the reply cannot start.
    """
    model = body.get("model")
    if model != assistant.name:
        raise ApiError(
            404,
            f"model {model!r} is not served here; this server serves {assistant.name!r}",
            kind="not_found_error",
            param="model",
        )
    if body.get("n", 1) != 1:
        raise ApiError(
            400, "n: only 1 (decoding is greedy: every choice would be the same)", param="n"
        )
    most = _int(body, ("max_completion_tokens", "max_tokens"), max_new_tokens)
    turns, found, system = parse_messages(body.get("messages"), images)
    if found and not decoding.acquire(timeout=DECODING_WAIT):
        raise ApiError(
            503, "the server is busy decoding other requests' images; retry", kind="server_error"
        )
    try:
        read = [assistant.read(files, modality or None) for files, modality in found]
    finally:
        if found:
            decoding.release()
    return assistant.reply(read, turns, max_new_tokens=most, system=system)


def _completion(reply: Any, ident: str, model: str, images: _Images) -> dict[str, Any]:
    """The whole reply as one ``chat.completion`` (the request's files removed once decoded)."""
    try:
        text = "".join(reply)
    finally:
        images.close()
    answer = reply.answer
    return {
        "id": ident,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text.strip()},
                "finish_reason": answer.finish_reason,
            }
        ],
        "usage": _usage(answer),
    }


def _usage(answer: Any) -> dict[str, int]:
    return {
        "prompt_tokens": answer.prompt_tokens,
        "completion_tokens": answer.completion_tokens,
        "total_tokens": answer.prompt_tokens + answer.completion_tokens,
    }


def _one_line(error: BaseException, images: _Images) -> str:
    """The CLI's line; files the request sent are named by their own names, not scratch paths."""
    message = str(error)
    if images.scratch is not None:
        message = re.sub(re.escape(str(images.scratch)) + r"/\d+/", "", message)
    # The command line's words, as an HTTP caller says the same.
    message = message.replace("give --modality", 'give "modality" in the image_url part')
    return re.sub(r"--modality (\S+)", r'"modality": \1', message)


def _events(reply: Any, ident: str, model: str, usage: bool, images: _Images) -> Iterator[str]:
    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
        payload = {
            "id": ident,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            **extra,
        }
        return f"data: {json.dumps(payload)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        for piece in reply:
            yield chunk({"content": piece})
        answer = reply.answer
        yield chunk({}, answer.finish_reason)
        if usage:
            payload = {
                "id": ident,
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": model,
                "choices": [],
                "usage": _usage(answer),
            }
            yield f"data: {json.dumps(payload)}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        images.close()
