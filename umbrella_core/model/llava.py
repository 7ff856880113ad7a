"""The LLaVA layouts UMBRELLA trains: their transformers classes and configs.

Both the checkpoint reader (:mod:`umbrella_core.model.build`) and the reader of
an exported folder (:mod:`umbrella_core.model.exported`) build a LLaVA model
of a config's layout; the class is told here, in a module that imports neither,
so that build.py can import the export reader and not the other way round (the
core has no import cycle).
"""

from __future__ import annotations

from typing import Any

from umbrella_core.errors import ModelError

__all__ = ["LLAVA_TYPES", "llava_class", "read_llava_config"]

#: The LLaVA layouts a ``model.base`` checkpoint may have (``config.json``'s model_type).
LLAVA_TYPES = ("llava", "llava_onevision")


def llava_class(model_type: str, where: str = "model.base") -> Any:
    """The transformers class of a LLaVA layout: llava-1.5 / llava-interleave (CLIP or SigLIP
    towers, ``llava``) or LLaVA-OneVision (``llava_onevision``)."""
    import transformers

    names = {
        "llava": "LlavaForConditionalGeneration",
        "llava_onevision": "LlavaOnevisionForConditionalGeneration",
    }
    if model_type not in names:
        raise ModelError(
            f"{where}: a {model_type!r} model is not a LLaVA layout UMBRELLA trains "
            f"({', '.join(LLAVA_TYPES)}); for a language model alone use model.language"
        )
    return getattr(transformers, names[model_type])


def read_llava_config(location: str, local: bool, name: str) -> Any:
    """The config of a LLaVA checkpoint (a folder or a hub id), refused unless it is a layout
    UMBRELLA trains (:data:`LLAVA_TYPES`)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(location, local_files_only=local)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{name}: cannot read a model config: {exc}") from exc
    if getattr(config, "vision_config", None) is None:
        raise ModelError(
            f"model.base: {name} is a {config.model_type!r} model without a vision tower; "
            "compose a LLaVA-style model from it with model.language (--language)"
        )
    llava_class(config.model_type)
    return config
