"""Building, saving and loading UMBRELLA models.

Base models:

* ``tiny`` (default): a LLaVA-style model built from a config with random
  weights (a CLIP-style vision body and a Llama-style language model, about a
  million parameters) and the built-in byte-level tokenizer. Offline.
* any local directory or hub id of a Llava checkpoint, loaded with
  ``from_pretrained``. A hub id is only contacted because the user named it (I8).

A checkpoint written by :func:`save_checkpoint` is a folder with
``config.json`` (the Llava config), ``model.safetensors`` (all weights),
``umbrella.json`` (modalities, geometry, the plugins that provided them) and
the tokenizer files. Nothing is pickled (I7).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from umbrella_core.errors import ModelError, PluginError
from umbrella_core.types import LossTerm, ModalitySpec

__all__ = [
    "TINY",
    "tiny_llava_config",
    "load_base",
    "build_model",
    "save_checkpoint",
    "load_checkpoint",
    "CHECKPOINT_META",
]

TINY = "tiny"
CHECKPOINT_META = "umbrella.json"
WEIGHTS = "model.safetensors"


def tiny_llava_config(
    vocab_size: int,
    image_token_id: int,
    pad_token_id: int,
    *,
    hidden_size: int = 128,
    vision_hidden_size: int = 128,
    layers: int = 2,
    heads: int = 4,
    max_position_embeddings: int = 2048,
) -> Any:
    """The Llava config of the built-in ``tiny`` model."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=vision_hidden_size,
        intermediate_size=vision_hidden_size * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        # The 2D patch embedding these describe is replaced by 3D/4D embedders.
        image_size=32,
        patch_size=8,
        num_channels=1,
    )
    text = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=pad_token_id,
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
    )


def load_base(name: str, *, seed: int = 0) -> tuple[Any, Any, bool]:
    """``(llava, tokenizer, is_random)`` for ``tiny`` or a Llava checkpoint path / hub id."""
    import torch
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    from umbrella_core.model.tokenizer import build_byte_tokenizer, ensure_image_token

    if name == TINY:
        tokenizer = build_byte_tokenizer()
        image_id = ensure_image_token(tokenizer)
        config = tiny_llava_config(len(tokenizer), image_id, tokenizer.pad_token_id)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            llava = LlavaForConditionalGeneration(config)
        return llava, tokenizer, True
    local = Path(name).expanduser()
    if local.exists() and not (local / "config.json").is_file():
        raise ModelError(f"{local}: not a model folder (no config.json)")
    location = str(local) if local.exists() else name
    try:
        llava = LlavaForConditionalGeneration.from_pretrained(
            location, local_files_only=local.exists()
        )
        tokenizer = AutoTokenizer.from_pretrained(location, local_files_only=local.exists())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{name}: cannot load a Llava model and tokenizer: {exc}") from exc
    ensure_image_token(tokenizer, llava.config.image_token_id)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return llava, tokenizer, False


def build_model(
    llava: Any,
    specs: Mapping[str, ModalitySpec],
    embedder_factory: Any,
    *,
    loss_terms: Sequence[LossTerm] = (),
    seed: int = 0,
) -> Any:
    """An :class:`UmbrellaModel` from a Llava model and the active modalities.

    ``embedder_factory(spec, hidden_size)`` returns each modality's patch embedder
    (normally :meth:`PluginManager.patch_embedder`). Embedders are created in
    canonical order under a fixed seed so every rank builds identical weights.
    """
    import torch

    from umbrella_core.model.umbrella import UmbrellaModel

    vision_config = llava.config.vision_config
    hidden = int(vision_config.hidden_size)
    embedders = {}
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for name, spec in specs.items():
            embedders[name] = embedder_factory(spec, hidden)
    return UmbrellaModel(
        llava, specs, embedders, image_token_id=llava.config.image_token_id, loss_terms=loss_terms
    )


def _atomic_dir(target: Path) -> Path:
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def save_checkpoint(
    model: Any,
    tokenizer: Any,
    directory: str | os.PathLike,
    *,
    provenance: Mapping[str, tuple[str, str, str]],
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write a checkpoint folder atomically (written aside, then renamed into place).

    Args:
        provenance: modality → (plugin, distribution, version) of the plugin that provided it.
        extra: More metadata (the run configuration, metrics) stored in ``umbrella.json``.
    """
    import shutil

    from safetensors.torch import save_model

    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _atomic_dir(target)
    model.config.save_pretrained(tmp)
    save_model(model, str(tmp / WEIGHTS))
    tokenizer.save_pretrained(tmp)
    meta = {
        "format": "umbrella-checkpoint",
        "version": 1,
        "modalities": [
            {
                "name": name,
                "shape": list(spec.shape),
                "patch_size": list(spec.patch_size),
                "channels": spec.channels,
                "plugin": provenance.get(name, ("", "", ""))[0],
                "distribution": provenance.get(name, ("", "", ""))[1],
                "version": provenance.get(name, ("", "", ""))[2],
            }
            for name, spec in model.specs.items()
        ],
        **dict(extra or {}),
    }
    (tmp / CHECKPOINT_META).write_text(json.dumps(meta, indent=2, default=str) + "\n")
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old)
    else:
        tmp.rename(target)
    return target


def load_checkpoint(directory: str | os.PathLike, plugin_manager: Any) -> tuple[Any, Any, dict]:
    """``(model, tokenizer, meta)`` from a checkpoint folder.

    Raises:
        ModelError: the folder is not a checkpoint, or a modality it needs has
            no installed plugin (the message says which distribution to install).
    """
    from safetensors.torch import load_model
    from transformers import AutoTokenizer, LlavaConfig, LlavaForConditionalGeneration

    folder = Path(directory)
    meta_path = folder / CHECKPOINT_META
    if not meta_path.is_file():
        raise ModelError(f"{folder}: not an UMBRELLA checkpoint (no {CHECKPOINT_META})")
    meta = json.loads(meta_path.read_text())
    specs: dict[str, ModalitySpec] = {}
    for entry in meta["modalities"]:
        try:
            spec = plugin_manager.resolve_modality(entry["name"]).item
        except PluginError:
            raise ModelError(
                f"{folder}: the checkpoint needs modality {entry['name']!r} from "
                f"{entry.get('distribution') or 'a plugin'} {entry.get('version', '')}, which is "
                f"not installed; install it (pip install {entry.get('distribution') or '...'})"
            ) from None
        specs[spec.name] = attrs.evolve(
            spec.with_geometry(entry["shape"], entry["patch_size"]), channels=entry["channels"]
        )
    config = LlavaConfig.from_pretrained(folder)
    llava = LlavaForConditionalGeneration(config)
    model = build_model(llava, specs, plugin_manager.patch_embedder)
    load_model(model, str(folder / WEIGHTS), strict=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return model, tokenizer, meta
