"""``umbrella export``: a checkpoint as a folder others can use, with or without UMBRELLA.

The folder::

    OUTPUT/
      language/            a plain transformers causal-LM folder (config, weights,
                           generation config, tokenizer with its chat template):
                           AutoModelForCausalLM / AutoTokenizer load it, no
                           UMBRELLA and no peft needed; LoRA adapters merged in
      vision.safetensors   the patch embedders (embedders.<modality>.*), the shared
                           vision body (vision.*) and the projector (projector.*);
                           its metadata (key "umbrella", a JSON string) holds each
                           modality's geometry, the image token id, the widths
      umbrella.json        what UMBRELLA needs to put the whole model together again
                           (format "umbrella-export"): load_checkpoint and
                           ``umbrella generate --checkpoint OUTPUT`` read it
      README.md            a model card: data, training, evaluation, how to load it

Text alone runs without UMBRELLA; images need their modality's plugin (its
embedder code), so the whole model is UMBRELLA's to load. The reader is
:mod:`umbrella_core.model.exported` (which load_checkpoint calls), the model
card :mod:`umbrella_core.export.model_card`.

The folder is written aside and renamed into place: a failed export leaves
nothing, and with ``overwrite`` the earlier folder stays whole until the new one
is complete.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from umbrella_core.constants import CORE_VERSION
from umbrella_core.errors import ConfigError, ModelError
from umbrella_core.export.model_card import (
    CARD,
    card_families,
    held_out_results,
    render_card,
    split_counts,
)
from umbrella_core.model.build import (
    load_checkpoint,
    merge_lora,
    swap_into_place,
)
from umbrella_core.model.exported import (
    CHECKPOINT_META,
    EXPORT_FORMAT,
    LANGUAGE_DIR,
    VISION_WEIGHTS,
    is_export,
    vision_weight_names,
)

__all__ = ["export_checkpoint", "language_causal_lm"]

#: Keys of a checkpoint's ``umbrella.json`` that an export writes anew.
_COMPUTED = {
    "format",
    "version",
    "modalities",
    "lora",
    "umbrella_core",
    "llava_config",
    "vision_metadata",
}


def export_checkpoint(
    source: str | os.PathLike,
    target: str | os.PathLike,
    plugin_manager: Any,
    *,
    merge: bool = True,
    overwrite: bool = False,
) -> tuple[Path, bool]:
    """Write the model of checkpoint ``source`` as the hand-off folder ``target``.

    Args:
        source: A checkpoint folder (a run's ``final/``, ``best/``) or an
            earlier export.
        target: The folder to write; it must not exist or be empty, unless
            ``overwrite``.
        plugin_manager: Provides the modalities' embedders (to load ``source``).
        merge: Accepted for callers of the earlier ``export_checkpoint``; LoRA
            adapters are always merged, since ``language/`` must load without peft.
        overwrite: Replace an earlier export at ``target``.

    Returns:
        ``(folder, merged)``: the written folder, and whether LoRA adapters were merged.

    Raises:
        ModelError: ``target`` is ``source`` or holds it; ``source`` does not load.
        ConfigError: ``target`` is not a folder, or not empty and ``overwrite`` is off,
            or, with ``overwrite``, holds something other than an earlier export.
    """
    del merge  # always merged (see Args)
    source = Path(source).expanduser()
    target = Path(target).expanduser()
    if source.resolve() == target.resolve() or target.resolve() in source.resolve().parents:
        raise ModelError(f"{target}: export to a new folder, not over the checkpoint itself")
    _check_target(target, overwrite)
    model, tokenizer, meta = load_checkpoint(source, plugin_manager)
    lora = model.lora_settings
    if lora is not None:
        merge_lora(model)
    evaluation, evaluated = held_out_results(source, meta)
    subjects = meta.get("subjects") or split_counts(source)
    with _written_whole(target) as tmp:
        _write_language(model, tokenizer, meta, tmp / LANGUAGE_DIR)
        _write_vision(model, tmp / VISION_WEIGHTS)
        exported = _export_meta(model, meta, source, lora, evaluation, evaluated, subjects)
        (tmp / CHECKPOINT_META).write_text(json.dumps(exported, indent=2, default=str) + "\n")
        card = render_card(exported, name=target.name, families=card_families(plugin_manager))
        (tmp / CARD).write_text(card, encoding="utf-8")
    return target, lora is not None


def _check_target(target: Path, overwrite: bool) -> None:
    if not target.exists() and not target.is_symlink():
        return
    if not target.is_dir():
        raise ConfigError(f"{target}: exists and is not a folder; give a new folder to export to")
    held = sorted(p.name for p in target.iterdir())
    if not held:
        return
    if not overwrite:
        raise ConfigError(
            f"{target}: the folder is not empty; give a new one, or --overwrite to replace it"
        )
    if not is_export(target):
        # --overwrite replaces an earlier export, never a folder of the user's own files.
        shown = ", ".join(held[:3]) + (f" and {len(held) - 3} more" if len(held) > 3 else "")
        raise ConfigError(
            f"{target}: holds files that are not an umbrella export ({shown}); --overwrite "
            "replaces an earlier export only: give a new or empty folder"
        )


@contextmanager
def _written_whole(target: Path) -> Iterator[Path]:
    """A scratch folder beside ``target`` that becomes ``target`` when the block succeeds."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.export-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        swap_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# -- the language model --------------------------------------------------------


def language_causal_lm(model: Any) -> Any:
    """The UMBRELLA model's language side as a transformers causal LM (sharing its modules).

    The built-in ``tiny`` model and a LLaVA checkpoint hold a decoder (e.g. a
    ``LlamaModel``) and an ``lm_head``; a composed one the modules of the causal
    LM it was built from. Either way the causal-LM class of the text config,
    built without weights, takes the decoder and head: its state dict is then
    what ``from_pretrained`` of that class expects, tied embeddings included.

    Raises:
        ModelError: the text config has no causal-LM class, or its decoder is
            not the one the model holds.
    """
    import torch
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config.get_text_config())
    decoder = model.language_model
    head = model.llava.get_output_embeddings()
    # What the weights are, not what a config says, decides the tie.
    config.tie_word_embeddings = head.weight is decoder.get_input_embeddings().weight
    try:
        with torch.device("meta"):
            causal = AutoModelForCausalLM.from_config(config)
    except ValueError as exc:
        raise ModelError(
            f"the language model ({config.model_type}) has no transformers causal-LM class: "
            f"{str(exc).splitlines()[0]}"
        ) from None
    shell = causal.get_decoder()
    slot = next((name for name, child in causal.named_children() if child is shell), None)
    if slot is None or set(shell.state_dict()) != set(decoder.state_dict()):
        raise ModelError(
            f"cannot export the language model: {type(causal).__name__} does not hold a "
            f"{type(decoder).__name__} as UMBRELLA's model does"
        )
    setattr(causal, slot, decoder)
    causal.set_output_embeddings(head)
    empty = [n for n, t in [*causal.named_parameters(), *causal.named_buffers()] if t.is_meta]
    if empty:
        raise ModelError(f"cannot export the language model: {empty[0]} has no weights")
    return causal


def _write_language(model: Any, tokenizer: Any, meta: Mapping[str, Any], folder: Path) -> None:
    from transformers import GenerationConfig
    from transformers.utils import logging as hf_logging

    causal = language_causal_lm(model)
    model_settings = (meta.get("config") or {}).get("model") or {}
    stops = _chat_template(tokenizer, model_settings)
    generation = GenerationConfig.from_model_config(causal.config)
    generation.bos_token_id = tokenizer.bos_token_id
    # Generation stops where UMBRELLA's does: at eos or the template's end of turn.
    generation.eos_token_id = stops[0] if len(stops) == 1 else (stops or None)
    generation.pad_token_id = tokenizer.pad_token_id
    causal.generation_config = generation
    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        causal.save_pretrained(folder)
    finally:
        if shown:
            hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(folder)


def _chat_template(tokenizer: Any, model_settings: Mapping[str, Any]) -> list[int]:
    """Give ``tokenizer`` the chat template training used; returns the ids generation stops at.

    A run's tokenizer already carries it (``prepare_tokenizer``); one saved
    without gets what ``model.chat_template`` means for it, where that needs no
    token it lacks (new tokens would not fit the embeddings).
    """
    from umbrella_core.model.chat import chat_format
    from umbrella_core.model.chat_templates import TEMPLATE_TOKENS, has_token, resolve_template

    setting = str(model_settings.get("chat_template") or "auto")
    try:
        if not getattr(tokenizer, "chat_template", None):
            text, name = resolve_template(tokenizer, setting)
            if all(has_token(tokenizer, t) for t in TEMPLATE_TOKENS.get(name, ())):
                tokenizer.chat_template = text
        if getattr(tokenizer, "chat_template", None):
            return list(chat_format(tokenizer, "auto").stop_token_ids)
    except ConfigError:
        pass  # a template file gone since training: the tokenizer's eos still stops
    return [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]


# -- the vision side -----------------------------------------------------------


def _vision_description(model: Any) -> dict[str, Any]:
    text = model.config.get_text_config()
    return {
        "format": "umbrella-vision",
        "version": 1,
        "image_token_id": model.image_token_id,
        "vision_hidden_size": model.vision_hidden_size,
        "text_hidden_size": int(text.hidden_size),
        "vision_feature_layer": model.config.vision_feature_layer,
        "projector_hidden_act": getattr(model.config, "projector_hidden_act", None),
        "modalities": {
            name: {
                "input_shape": list(spec.input_shape),
                "shape": list(spec.shape),
                "patch_size": list(spec.patch_size),
                "channels": spec.channels,
                "num_tokens": spec.num_tokens,
            }
            for name, spec in model.specs.items()
        },
        "parts": {
            "embedders": "embedders.<modality>.*: (B, C, *shape) images to (B, num_tokens, "
            "vision_hidden_size) tokens",
            "vision": "vision.*: the shared vision body over those tokens",
            "projector": "projector.*: vision_hidden_size to text_hidden_size, the tokens "
            "that replace each image's num_tokens <image> placeholders",
        },
    }


def _write_vision(model: Any, path: Path) -> None:
    from safetensors.torch import save_file

    state = model.state_dict()
    names = vision_weight_names(model)
    tensors = {out: state[name].detach().contiguous().cpu() for name, out in names.items()}
    metadata = {"format": "pt", "umbrella": json.dumps(_vision_description(model))}
    save_file(tensors, str(path), metadata=metadata)


# -- umbrella.json -------------------------------------------------------------


def _export_meta(
    model: Any,
    meta: Mapping[str, Any],
    source: Path,
    lora: Mapping[str, Any] | None,
    evaluation: Mapping[str, Any] | None,
    evaluated: str,
    subjects: Mapping[str, Mapping[str, int]] | None,
) -> dict[str, Any]:
    llava_config = model.config.to_dict()
    llava_config.pop("text_config", None)  # language/config.json holds it
    out: dict[str, Any] = {
        "format": EXPORT_FORMAT,
        "version": 1,
        "modalities": meta["modalities"],
        "llava_config": llava_config,
        "language": LANGUAGE_DIR,
        "vision": VISION_WEIGHTS,
        "vision_metadata": _vision_description(model),
        **{k: v for k, v in meta.items() if k not in _COMPUTED},
    }
    out["lora"] = None
    out["exported_from"] = {"checkpoint": str(source), "merged_lora": lora is not None}
    # The settings of the adapters now in language/ (a re-export keeps the first's).
    out["lora_merged"] = dict(lora) if lora is not None else meta.get("lora_merged")
    if evaluation:
        out["evaluation"] = {"source": evaluated, "results": evaluation}
    if subjects:
        out["subjects"] = subjects
    out["umbrella_core"] = CORE_VERSION
    return out
