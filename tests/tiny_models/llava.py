"""Tiny LLaVA checkpoints of the layouts UMBRELLA starts from, built in code.

``model.base`` accepts the LLaVA checkpoints researchers hold; they differ in
the vision family and in how features are taken from it:

============================ ============================ =========== =====================
layout                       like                         vision      features
============================ ============================ =========== =====================
``llava-1.5``                llava-hf/llava-1.5-7b-hf     CLIP        penultimate layer, no CLS
``llava-interleave``         llava-interleave-qwen-0.5b   SigLIP      last layer, all tokens
``llava-onevision``          llava-onevision-qwen2-0.5b   SigLIP      last layer, all tokens
============================ ============================ =========== =====================

:func:`save_tiny_llava` writes one with random weights and a tokenizer that
has ``<image>`` (as the real checkpoints' do), with ``save_pretrained``, so
tests go through the same ``from_pretrained`` path as a real checkpoint.
Importing this module imports neither torch nor transformers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["LLAVA_LAYOUTS", "save_tiny_llava", "save_tiny_vision_tower"]

#: Layout → (language family, vision family, model type).
LLAVA_LAYOUTS = {
    "llava-1.5": ("llama", "clip", "llava"),
    "llava-interleave": ("qwen2", "siglip", "llava"),
    "llava-onevision": ("qwen2", "siglip", "llava_onevision"),
}


def _vision_config(kind: str, hidden_size: int, layers: int) -> Any:
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    cls = CLIPVisionConfig if kind == "clip" else SiglipVisionConfig
    return cls(
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        num_channels=3,
    )


def save_tiny_vision_tower(
    kind: str, directory: str | Path, *, hidden_size: int = 32, layers: int = 2, seed: int = 0
) -> Path:
    """A random CLIP or SigLIP vision tower (``kind``: ``clip``, ``siglip``) in ``directory``."""
    import torch
    from transformers import CLIPVisionModel, SiglipVisionModel

    config = _vision_config(kind, hidden_size, layers)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tower = (CLIPVisionModel if kind == "clip" else SiglipVisionModel)(config)
    tower.save_pretrained(directory)
    return Path(directory)


def save_tiny_llava(
    layout: str,
    directory: str | Path,
    *,
    vocab_size: int = 2048,
    hidden_size: int = 32,
    vision_layers: int = 2,
    seed: int = 0,
) -> Path:
    """Write a random tiny LLaVA model of ``layout`` and its tokenizer to ``directory``.

    Args:
        layout: One of :data:`LLAVA_LAYOUTS`.
        vocab_size: Rows of the language model's embeddings (small: quick tests).
        hidden_size: Width of the language model and the vision tower.
        vision_layers: Layers of the vision tower.
        seed: Seeds the weights; the global random state is left as it was.
    """
    import torch
    import transformers

    from tiny_models.families import family_config, family_tokenizer
    from umbrella_core.model.tokenizer import add_image_token

    if layout not in LLAVA_LAYOUTS:
        raise ValueError(f"unknown LLaVA layout {layout!r}; known: {', '.join(LLAVA_LAYOUTS)}")
    family, vision, model_type = LLAVA_LAYOUTS[layout]
    tokenizer = family_tokenizer(family)
    image_id = add_image_token(tokenizer)
    text = family_config(
        family, vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size
    )
    settings: dict[str, Any] = {
        "vision_config": _vision_config(vision, hidden_size, vision_layers),
        "text_config": text,
        "image_token_index": image_id,
    }
    if layout == "llava-1.5":
        settings.update(vision_feature_layer=-2, vision_feature_select_strategy="default")
    else:
        settings.update(vision_feature_layer=-1, vision_feature_select_strategy="full")
    if model_type == "llava":
        config = transformers.LlavaConfig(**settings)
        cls = transformers.LlavaForConditionalGeneration
    else:
        config = transformers.LlavaOnevisionConfig(**settings)
        cls = transformers.LlavaOnevisionForConditionalGeneration
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    out = Path(directory)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
