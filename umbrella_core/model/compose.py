"""Composing a LLaVA-style model from a pretrained causal language model.

``model.language: PATH_OR_HUB_ID`` takes any ``AutoModelForCausalLM``
checkpoint (Llama, Qwen2/Qwen3, Gemma 3 text, Phi-3/4, SmolLM2, ...) and puts
in front of it the modalities' patch embedders, a vision body and a new
projector, as a ``LlavaForConditionalGeneration`` (the class every other part
of UMBRELLA already drives). The language model's own modules are moved in
unchanged, so what differs between families keeps working: tied input/output
embeddings stay tied, Gemma's scaled input embeddings stay inside its
embedding module (text tokens are scaled, image features are not, as in
Gemma 3's own multimodal model), vocabularies of any size, no pad token.

The vision body (``model.vision``) is one of

* ``fresh``: a CLIP-style transformer built from a config
  (``model.vision_layers`` layers of width ``model.vision_hidden_size``);
* ``none``: a tower without layers: the embedders' tokens go straight to the
  projector;
* a folder holding a pretrained CLIP or SigLIP model or vision tower: its
  transformer layers are kept, its 2D patch embedding is replaced by the 3D/4D
  embedders.

The result saves as an ordinary UMBRELLA checkpoint (``config.json`` is a
``LlavaConfig`` whose ``text_config`` is the language model's), which
``model.base`` (``--model``) loads again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from umbrella_core.errors import ConfigError, ModelError

__all__ = [
    "VISION_BODIES",
    "compose",
    "compose_model",
    "load_language_model",
    "vision_tower",
    "resolve_location",
]

#: The built-in choices of ``model.vision`` (anything else is a folder).
VISION_BODIES = ("fresh", "none")

_VISION_TYPES = {
    "clip": "clip",
    "clip_vision_model": "clip",
    "siglip": "siglip",
    "siglip_vision_model": "siglip",
}


def resolve_location(name: str, setting: str) -> tuple[str, bool]:
    """``(location, is_local)`` of a model the user named (I8: only named hub ids are fetched).

    A name that looks like a path (absolute, ``./``, ``../``, ``~``) must exist:
    a mistyped folder is an error, never a hub download.
    """
    local = Path(name).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise ModelError(f"{setting}: {local} is not a model folder (no config.json)")
        return str(local), True
    if name.startswith(("/", "./", "../", "~")) or name.count("/") > 1:
        raise ModelError(f"{setting}: {name}: no such folder")
    return name, False


def load_language_model(name: str, *, setting: str = "model.language") -> tuple[Any, Any]:
    """``(causal_lm, tokenizer)`` from a folder or a hub id the user named."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    location, local = resolve_location(name, setting)
    try:
        config = AutoConfig.from_pretrained(location, local_files_only=local)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{setting}: {name}: cannot read its config: {exc}") from None
    if getattr(config, "vision_config", None) is not None:
        raise ConfigError(
            f"{setting}: {name} is a vision-language model ({config.model_type}); "
            "give it as model.base (--model) to train on from its weights"
        )
    try:
        lm = AutoModelForCausalLM.from_pretrained(location, local_files_only=local, dtype="float32")
        tokenizer = AutoTokenizer.from_pretrained(location, local_files_only=local)
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"{setting}: {name}: cannot load a causal language model and its tokenizer: {exc}"
        ) from None
    return lm, tokenizer


def _fresh_vision_config(hidden_size: int, layers: int) -> Any:
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 4,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden_size // 64),
        # The 2D patch embedding these describe is replaced by 3D/4D embedders.
        image_size=32,
        patch_size=8,
        num_channels=1,
    )


def vision_tower(
    setting: str, *, hidden_size: int = 256, layers: int = 2, seed: int = 0
) -> tuple[Any, Any]:
    """``(vision_config, tower)`` for ``model.vision``: ``fresh``, ``none`` or a folder."""
    import torch
    from transformers import AutoConfig, AutoModel, CLIPVisionModel, SiglipVisionModel

    if setting in VISION_BODIES:
        config = _fresh_vision_config(hidden_size, layers if setting == "fresh" else 0)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return config, AutoModel.from_config(config)
    location, local = resolve_location(setting, "model.vision")
    try:
        kind = _VISION_TYPES.get(
            AutoConfig.from_pretrained(location, local_files_only=local).model_type
        )
    except (OSError, ValueError) as exc:
        raise ModelError(f"model.vision: {setting}: cannot read its config: {exc}") from None
    if kind is None:
        raise ConfigError(
            f"model.vision: {setting} is neither a CLIP nor a SigLIP model; give fresh, none "
            "or a CLIP / SigLIP (vision) model folder"
        )
    cls = CLIPVisionModel if kind == "clip" else SiglipVisionModel
    try:
        tower = cls.from_pretrained(location, local_files_only=local, dtype="float32")
    except (OSError, ValueError) as exc:
        raise ModelError(f"model.vision: {setting}: cannot load its vision tower: {exc}") from None
    return tower.config, tower


def compose_model(
    lm: Any,
    tokenizer: Any,
    *,
    vision: str = "fresh",
    vision_hidden_size: int = 256,
    vision_layers: int = 2,
    seed: int = 0,
) -> tuple[Any, Any]:
    """``(llava, tokenizer)``: ``lm`` with a vision body and a new projector in front.

    The tokenizer gets an ``<image>`` token (special; the embeddings grow only
    where the vocabulary has no free row for it) and, without a pad token, pads
    with its end-of-sequence token (padding is masked out of attention and loss).
    """
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    from umbrella_core.model.tokenizer import add_image_token

    vision_config, tower = vision_tower(
        vision, hidden_size=vision_hidden_size, layers=vision_layers, seed=seed
    )
    image_id = add_image_token(tokenizer)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ModelError("the language model's tokenizer has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    text_config = lm.config
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=image_id,
        # Our embedders emit no CLS token: every token is a feature (ARCHITECTURE pitfalls).
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
    )
    # Built on the meta device: a second, random language model of full size
    # would cost as much memory as the real one, only to be replaced.
    with torch.device("meta"):
        llava = LlavaForConditionalGeneration(config)
    llava.model.language_model = lm.get_decoder()
    llava.lm_head = lm.get_output_embeddings()
    llava.model.vision_tower = tower
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        llava.model.multi_modal_projector = LlavaMultiModalProjector(config)
    left = [name for name, p in llava.named_parameters() if p.is_meta]
    if left:
        raise ModelError(f"composing the model left parameters unset: {', '.join(left[:3])}")
    fit_embeddings(llava, tokenizer)
    return llava, tokenizer


def fit_embeddings(llava: Any, tokenizer: Any) -> None:
    """Grow the language model's embeddings where the tokenizer outgrew them.

    Real vocabularies leave free rows (Qwen2.5: 151,665 tokens in 151,936 rows),
    so added tokens usually fit; new rows start at the mean embedding.
    """
    rows = llava.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        llava.resize_token_embeddings(len(tokenizer), mean_resizing=True)


def compose(
    name: str,
    *,
    vision: str = "fresh",
    vision_hidden_size: int = 256,
    vision_layers: int = 2,
    seed: int = 0,
) -> tuple[Any, Any]:
    """``(llava, tokenizer)`` composed from the causal language model ``name``."""
    lm, tokenizer = load_language_model(name)
    return compose_model(
        lm,
        tokenizer,
        vision=vision,
        vision_hidden_size=vision_hidden_size,
        vision_layers=vision_layers,
        seed=seed,
    )
