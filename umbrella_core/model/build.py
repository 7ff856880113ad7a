"""Building, saving and loading UMBRELLA models.

Base models:

* ``tiny`` (default): a LLaVA-style model built from a config with random
  weights (a CLIP-style vision body and a Llama-style language model, about a
  million parameters) and the built-in byte-level tokenizer. Offline.
* any local directory or hub id of a Llava checkpoint, loaded with
  ``from_pretrained``. A hub id is only contacted because the user named it (I8).
* an UMBRELLA checkpoint folder (a run's ``final/``): the whole model, patch
  embedders and LoRA adapters included, starts the new run (training stages).

A checkpoint written by :func:`save_checkpoint` is a folder with
``config.json`` (the Llava config), ``model.safetensors`` (all weights),
``umbrella.json`` (modalities, geometry, the plugins that provided them, the
LoRA settings, the run configuration) and the tokenizer files. Nothing is
pickled (I7).

LoRA adapters are saved unmerged: ``model.safetensors`` holds the language
model's frozen weights (``...q_proj.base_layer.weight``) and the adapters
(``...q_proj.lora_A.default.weight``) side by side, and ``umbrella.json`` the
settings that recreate them. A reloaded model gives bit-identical logits (a
merge would round), training can go on with the same adapters, and the base
weights can be checked untouched. :func:`merge_lora` folds them in for export.

:func:`load_checkpoint` also reads the hand-off folder ``umbrella export``
writes (:mod:`umbrella_core.export.folder`): ``language/`` (a plain transformers
causal LM), ``vision.safetensors`` (embedders, vision body, projector) and
``umbrella.json`` with ``format: umbrella-export``. Its reader is
:mod:`umbrella_core.model.exported`, which this module imports and which
imports neither this module nor the writer (no import cycle).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from umbrella_core.constants import CORE_VERSION
from umbrella_core.errors import ModelError, PluginError
from umbrella_core.model.exported import (
    CHECKPOINT_META,
    EXPORT_FORMAT,
    export_config,
    is_export,
    load_export,
    misfit,
    read_meta,
)
from umbrella_core.model.llava import llava_class, read_llava_config
from umbrella_core.types import LossTerm, ModalitySpec

__all__ = [
    "TINY",
    "tiny_llava_config",
    "load_base",
    "build_model",
    "save_checkpoint",
    "load_checkpoint",
    "is_checkpoint",
    "checkpoint_config",
    "merge_lora",
]

TINY = "tiny"
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

    from umbrella_core.model.compose import resolve_location
    from umbrella_core.model.tokenizer import build_byte_tokenizer, ensure_image_token

    if name == TINY:
        tokenizer = build_byte_tokenizer()
        image_id = ensure_image_token(tokenizer)
        config = tiny_llava_config(len(tokenizer), image_id, tokenizer.pad_token_id)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            # _from_config (what AutoModel.from_config calls) builds under
            # deepspeed.zero.Init when ZeRO-3 is on: partitioned as it is made.
            llava = LlavaForConditionalGeneration._from_config(config)
        return llava, tokenizer, True
    location, local = resolve_location(name, "model.base")
    config = read_llava_config(location, local, name)
    try:
        llava = llava_class(config.model_type).from_pretrained(
            location, local_files_only=local, dtype="float32"
        )
        tokenizer = AutoTokenizer.from_pretrained(location, local_files_only=local)
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


def _untied(model: Any, state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """``state_dict`` with one name per tied parameter, as ``safetensors.save_model`` writes.

    A gathered state dict holds tied weights (an LM head shared with the input
    embeddings) as separate tensors under both names; ties are found on the
    model by parameter identity, which holds under ZeRO-3 too.
    """
    seen: set[int] = set()
    out = {}
    for name, value in model.state_dict(keep_vars=True).items():
        if id(value) in seen:
            continue
        seen.add(id(value))
        if name not in state_dict:
            raise ModelError(f"cannot save the checkpoint: the gathered weights lack {name}")
        out[name] = state_dict[name].detach().contiguous().cpu()
    return out


def save_checkpoint(
    model: Any,
    tokenizer: Any,
    directory: str | os.PathLike,
    *,
    provenance: Mapping[str, tuple[str, str, str]],
    extra: Mapping[str, Any] | None = None,
    state_dict: Mapping[str, Any] | None = None,
) -> Path:
    """Write a checkpoint folder atomically (written aside, then renamed into place).

    Args:
        provenance: modality → (plugin, distribution, version) of the plugin that provided it.
        extra: More metadata (the run configuration, metrics) stored in ``umbrella.json``.
        state_dict: The weights to write instead of the model's own (DeepSpeed
            ZeRO-3 gathers them for saving; the model then holds only its
            partition).
    """

    from safetensors.torch import save_file, save_model

    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _atomic_dir(target)
    model.config.save_pretrained(tmp)
    if state_dict:
        save_file(_untied(model, state_dict), str(tmp / WEIGHTS), metadata={"format": "pt"})
    else:
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
    meta["lora"] = getattr(model, "lora_settings", None)
    meta["vision_new"] = bool(getattr(model, "vision_is_new", False))
    meta["umbrella_core"] = CORE_VERSION
    (tmp / CHECKPOINT_META).write_text(json.dumps(meta, indent=2, default=str) + "\n")
    swap_into_place(tmp, target)
    return target


def swap_into_place(tmp: Path, target: Path) -> None:
    """Rename the finished folder ``tmp`` to ``target``, replacing a folder already there.

    The old folder is set aside, not deleted first: a crash between the
    renames leaves a whole folder under one of the two names.
    """
    import shutil

    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old)
    else:
        tmp.rename(target)


def is_checkpoint(location: str | os.PathLike) -> bool:
    """Whether ``location`` is a folder written by :func:`save_checkpoint`."""
    return (Path(location).expanduser() / CHECKPOINT_META).is_file()


def load_checkpoint(
    directory: str | os.PathLike,
    plugin_manager: Any,
    *,
    loss_terms: Sequence[LossTerm] = (),
) -> tuple[Any, Any, dict]:
    """``(model, tokenizer, meta)`` from a checkpoint folder (LoRA adapters recreated)
    or a folder ``umbrella export`` wrote.

    Raises:
        ModelError: the folder is not a checkpoint, a modality it needs has no
            installed plugin (the message names the modality and the
            distribution to install), or the installed plugin builds an
            embedder that does not fit the saved weights.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_model
    from transformers import AutoTokenizer

    folder = Path(directory)
    meta = read_meta(folder)
    specs = _checkpoint_specs(folder, meta, plugin_manager)
    if meta.get("format") == EXPORT_FORMAT:
        return load_export(
            folder,
            meta,
            lambda llava: build_model(
                llava, specs, plugin_manager.patch_embedder, loss_terms=loss_terms
            ),
        )
    config = checkpoint_config(folder)
    llava = llava_class(config.model_type, str(folder))(config)
    model = build_model(llava, specs, plugin_manager.patch_embedder, loss_terms=loss_terms)
    if meta.get("lora"):
        model.add_lora(**meta["lora"])
    model.vision_is_new = bool(meta.get("vision_new", False))
    try:
        load_model(model, str(folder / WEIGHTS), strict=True)
    except RuntimeError as exc:
        raise misfit(folder, meta, exc) from None
    except (OSError, SafetensorError) as exc:
        raise ModelError(
            f"{folder / WEIGHTS}: cannot be read ({exc}): the file is truncated or damaged; "
            "copy the checkpoint again, or use another checkpoint of the run"
        ) from None
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, meta


def _checkpoint_specs(folder: Path, meta: Mapping[str, Any], plugin_manager: Any) -> dict:
    """The saved modalities, as the installed plugins define them, at the saved geometry."""
    specs: dict[str, ModalitySpec] = {}
    for entry in meta["modalities"]:
        try:
            spec = plugin_manager.resolve_modality(entry["name"]).item
        except PluginError:
            dist = entry.get("distribution")
            saved = (
                f" (the checkpoint was saved with version {entry['version']})"
                if entry.get("version")
                else ""
            )
            install = (
                f"install the {dist} distribution{saved}: pip install {dist}"
                if dist
                else "install the plugin that provides it"
            )
            raise ModelError(
                f"{folder}: the checkpoint needs modality {entry['name']!r}, which no "
                f"installed plugin provides; {install}"
            ) from None
        specs[spec.name] = attrs.evolve(
            spec.with_geometry(entry["shape"], entry["patch_size"]), channels=entry["channels"]
        )
    return specs


def checkpoint_config(folder: Path) -> Any:
    """The LLaVA config of an UMBRELLA checkpoint folder (any of :data:`LLAVA_TYPES`), or
    of an exported one (its language model's config inside the stored LLaVA settings)."""
    from transformers import AutoConfig

    folder = Path(folder)
    if is_export(folder):
        return export_config(folder, read_meta(folder))
    return AutoConfig.from_pretrained(folder, local_files_only=True)


def merge_lora(model: Any) -> Any:
    """Fold the LoRA adapters into the language model's weights, in place; returns ``model``.

    The result is a plain model (no adapters, ``lora_settings`` None) whose
    checkpoint loads without peft; its logits equal the adapted model's up to
    floating-point rounding.
    """
    from peft.tuners.lora import LoraLayer

    if getattr(model, "lora_settings", None) is None:
        return model
    lm = model.language_model
    for name, module in list(lm.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = lm.get_submodule(parent_name) if parent_name else lm
            setattr(parent, child, module.get_base_layer())
    model.lora_settings = None
    return model
