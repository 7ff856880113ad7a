"""What a run starts from: the model, its tokenizer, and what trains.

:func:`start_model` turns the run's ``model`` section into a model with only
the chosen parameters trainable, from one of four starts (``tiny``, a LLaVA
checkpoint, an UMBRELLA checkpoint, or a model composed from a causal
language model, :mod:`umbrella_core.model.compose`), and says why it chose
what trains. :func:`load_tokenizer` gives the same tokenizer without loading
any weights (``umbrella validate --config``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from umbrella_core.errors import ConfigError, ModelError
from umbrella_core.model.build import (
    TINY,
    build_model,
    checkpoint_config,
    is_checkpoint,
    load_base,
    load_checkpoint,
)
from umbrella_core.model.exported import language_folder
from umbrella_core.model.llava import read_llava_config
from umbrella_core.types import LossTerm, ModalitySpec

__all__ = ["Started", "auto_trainable", "start_model", "load_tokenizer"]


def load_tokenizer(model_config: Any) -> tuple[Any, int]:
    """``(tokenizer, image_token_id)`` of a run's model, without loading its weights.

    ``model_config`` is the run's ``model`` section (or a ``base`` name). For
    ``tiny`` the byte-level tokenizer; for a Llava or UMBRELLA checkpoint
    folder (or a hub id the user names) its tokenizer and the image token of
    its config (an exported folder's tokenizer is in its ``language/``); for
    ``model.language`` the language model's tokenizer with the ``<image>``
    token a composed model adds. The chat template setting is
    applied as :func:`start_model` applies it.
    """
    from transformers import AutoTokenizer

    from umbrella_core.model.compose import resolve_location
    from umbrella_core.model.tokenizer import (
        add_image_token,
        build_byte_tokenizer,
        ensure_image_token,
    )

    if isinstance(model_config, str):
        from umbrella_core.config import ModelConfig

        model_config = ModelConfig(base=model_config)
    name = model_config.language or model_config.base
    if name == TINY:
        tokenizer = build_byte_tokenizer()
        image_id = ensure_image_token(tokenizer)
    elif model_config.language:
        location, local = resolve_location(name, "model.language")
        try:
            tokenizer = AutoTokenizer.from_pretrained(location, local_files_only=local)
        except (OSError, ValueError) as exc:
            raise ModelError(f"{name}: cannot load its tokenizer: {exc}") from exc
        image_id = add_image_token(tokenizer)
    else:
        if is_checkpoint(name):
            # Read where it lies, not through resolve_location: an exported folder has
            # no config.json of its own, and keeps its tokenizer in language/.
            folder = Path(name).expanduser()
            config = checkpoint_config(folder)
            location, local = str(language_folder(folder)), True
        else:
            location, local = resolve_location(name, "model.base")
            config = read_llava_config(location, local, name)
        try:
            tokenizer = AutoTokenizer.from_pretrained(location, local_files_only=local)
        except (OSError, ValueError) as exc:
            raise ModelError(f"{name}: cannot load its tokenizer: {exc}") from exc
        image_id = ensure_image_token(tokenizer, config.image_token_id)
    _prepare_chat(tokenizer, model_config)
    return tokenizer, int(image_id)


def _prepare_chat(tokenizer: Any, model_config: Any) -> list[str]:
    """Ready ``tokenizer`` for ``model.chat_template``; returns the tokens it had to add."""
    from umbrella_core.model.chat_templates import prepare_tokenizer

    return list(prepare_tokenizer(tokenizer, getattr(model_config, "chat_template", "auto")))


def _geometry(spec: ModalitySpec) -> str:
    return (
        f"{spec.name} {'x'.join(map(str, spec.shape))} patch {'x'.join(map(str, spec.patch_size))}"
        f" x{spec.channels}"
    )


@attrs.define
class Started:
    """The model a run starts from, and how it was chosen (see :func:`start_model`)."""

    model: Any
    tokenizer: Any
    #: ``tiny`` with random weights: nothing in it is worth freezing.
    base_is_random: bool
    #: The trainable set: embedders | projector | lora | full.
    trainable: str
    #: Why, in words (``trainable: auto`` is explained).
    reason: str
    #: What it was built from: tiny | composed | llava | checkpoint.
    kind: str
    #: Tokens added to the tokenizer (``<image>``, the chat template's).
    added_tokens: list[str] = attrs.field(factory=list)


def auto_trainable(kind: str) -> tuple[str, str]:
    """``trainable: auto`` for a start of ``kind``, and why."""
    if kind == "tiny":
        return "full", "the built-in tiny model has random weights: nothing is worth freezing"
    if kind == "composed":
        return "lora", (
            "a model composed from a language model in one stage: LoRA adapters teach the "
            "language model to answer in its chat template, beside the new image path "
            "(umbrella train runs LLaVA's two stages instead)"
        )
    return "embedders", (
        f"a trained {'LLaVA' if kind == 'llava' else 'UMBRELLA'} model: its projector "
        "and language model are kept, the patch embedders train"
    )


def start_model(
    model_config: Any,
    specs: Mapping[str, ModalitySpec],
    plugin_manager: Any,
    *,
    loss_terms: Sequence[LossTerm] = (),
    seed: int = 0,
) -> Started:
    """The model a run starts from, with only the chosen parameters trainable.

    ``model_config`` is the run's ``model`` section. The model is composed from
    ``language`` (a causal language model) when it is set; otherwise ``base``
    is ``tiny``, a LLaVA checkpoint, or an UMBRELLA checkpoint, which must
    hold the run's modalities with the same geometry. ``trainable: auto``
    follows :func:`auto_trainable`; ``lora`` adds the adapters of
    ``model_config.lora`` (a checkpoint's adapters are kept). The tokenizer is
    readied for ``chat_template`` (the embeddings grow if it needs new tokens).
    """
    from umbrella_core.model.compose import compose, fit_embeddings

    language = getattr(model_config, "language", "")
    if language and model_config.base != TINY:
        raise ConfigError(
            f"model.language ({language}) and model.base ({model_config.base}) both name a "
            "model: compose from a language model, or start from a LLaVA/UMBRELLA checkpoint"
        )
    if language:
        llava, tokenizer = compose(
            language,
            vision=model_config.vision,
            vision_hidden_size=model_config.vision_hidden_size,
            vision_layers=model_config.vision_layers,
            seed=seed,
        )
        kind = "composed"
    elif is_checkpoint(model_config.base):
        model, tokenizer, _ = load_checkpoint(
            Path(model_config.base).expanduser(), plugin_manager, loss_terms=loss_terms
        )
        have = sorted(_geometry(s) for s in model.specs.values())
        want = sorted(_geometry(s) for s in specs.values())
        if have != want:
            raise ModelError(
                f"model.base: the checkpoint {model_config.base} was trained on "
                f"{'; '.join(have)}, but this run has {'; '.join(want)}: train with the "
                "same modalities and geometry (data.modalities, data.geometry)"
            )
        kind = "checkpoint"
    else:
        llava, tokenizer, is_random = load_base(model_config.base, seed=seed)
        kind = "tiny" if is_random else "llava"
    added = _prepare_chat(tokenizer, model_config)
    if kind != "checkpoint":
        fit_embeddings(llava, tokenizer)
        model = build_model(
            llava, specs, plugin_manager.patch_embedder, loss_terms=loss_terms, seed=seed
        )
    else:
        fit_embeddings(model.llava, tokenizer)
    if kind == "tiny" or (kind == "composed" and model_config.vision == "fresh"):
        model.vision_is_new = True
    trainable = model_config.trainable
    reason = "as model.trainable says"
    if trainable == "auto":
        trainable, reason = auto_trainable(kind)
        reason = f"auto: {reason}"
    if trainable == "lora" and model.lora_settings is None:
        lora = model_config.lora
        model.add_lora(
            r=lora.r,
            alpha=lora.alpha,
            dropout=lora.dropout,
            target_modules=lora.target_modules,
            seed=seed,
        )
    model.set_trainable(trainable)
    return Started(model, tokenizer, kind == "tiny", trainable, reason, kind, added)
