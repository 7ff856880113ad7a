"""Reading the folder ``umbrella export`` writes (:mod:`umbrella_core.export.folder`).

The layout: ``language/`` (a plain transformers causal LM with its tokenizer),
``vision.safetensors`` (embedders, vision body, projector) and ``umbrella.json``
with ``format: umbrella-export``. :func:`load_export` puts the whole UMBRELLA
model together again; :func:`umbrella_core.model.build.load_checkpoint` calls it
for such a folder.

Both the checkpoint reader (build.py) and the writer (export.py) import this
module, and it imports neither (the core has no import cycle): what they share
lives here, the file names, telling an export apart (:func:`is_export`) and the
names of the vision tensors (:func:`vision_weight_names`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from umbrella_core.errors import ModelError
from umbrella_core.model.llava import llava_class

__all__ = [
    "CHECKPOINT_META",
    "EXPORT_FORMAT",
    "LANGUAGE_DIR",
    "VISION_WEIGHTS",
    "is_export",
    "language_folder",
    "export_config",
    "vision_weight_names",
    "load_export",
    "misfit",
]

#: The metadata file of a checkpoint and of an export alike. Named here, where
#: the two are told apart, so that build.py takes it from this module.
CHECKPOINT_META = "umbrella.json"
#: ``umbrella.json``'s ``format`` in a folder ``umbrella export`` wrote.
EXPORT_FORMAT = "umbrella-export"
#: The exported language model, a plain transformers causal-LM folder.
LANGUAGE_DIR = "language"
#: The exported embedders, vision body and projector.
VISION_WEIGHTS = "vision.safetensors"


def read_meta(folder: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint's or export's ``umbrella.json``.

    Raises:
        ModelError: it is missing, unreadable, not JSON or not an object, naming the file.
    """
    path = Path(folder) / CHECKPOINT_META
    if not path.is_file():
        raise ModelError(f"{Path(folder)}: not an UMBRELLA checkpoint (no {CHECKPOINT_META})")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError too
        raise ModelError(
            f"{path}: cannot be read as JSON ({exc}); the checkpoint is damaged: copy it "
            "again, or use another checkpoint of the run"
        ) from None
    if not isinstance(meta, dict):
        raise ModelError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    return meta


def is_export(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is one ``umbrella export`` wrote (its ``umbrella.json`` says
    format ``umbrella-export``); False for a checkpoint, or a folder without one."""
    if not (Path(folder) / CHECKPOINT_META).is_file():
        return False
    return read_meta(folder).get("format") == EXPORT_FORMAT


def language_folder(folder: str | os.PathLike) -> Path:
    """Where an UMBRELLA folder keeps its tokenizer and language-model config:
    ``language/`` of an export, the checkpoint folder itself otherwise."""
    folder = Path(folder)
    return folder / LANGUAGE_DIR if is_export(folder) else folder


def export_config(folder: Path, meta: Mapping[str, Any]) -> Any:
    """The LLaVA config of an exported folder: its language model's config inside the
    LLaVA settings ``umbrella.json`` stores (``meta``)."""
    from transformers import CONFIG_MAPPING, AutoConfig

    text = AutoConfig.from_pretrained(Path(folder) / LANGUAGE_DIR, local_files_only=True)
    stored = dict(meta["llava_config"])
    return CONFIG_MAPPING[stored["model_type"]].from_dict({**stored, "text_config": text.to_dict()})


def misfit(folder: Path, meta: Mapping[str, Any], exc: Exception) -> ModelError:
    """The error of saved weights (a checkpoint's or an export's) that do not fit the
    model the installed plugins build, naming the plugins they were saved with."""
    saved = ", ".join(
        f"{e['name']} from {e.get('distribution')} {e.get('version')}" for e in meta["modalities"]
    )
    return ModelError(
        f"{folder}: the weights do not fit the model the installed plugins build "
        f"(saved with {saved}): {str(exc).splitlines()[0]}"
    )


def vision_weight_names(model: Any) -> dict[str, str]:
    """Each non-language weight of ``model`` (state-dict name) → its name in
    ``vision.safetensors``: ``embedders.<modality>.…``, ``vision.…`` (the shared
    body), ``projector.…``, and ``other.…`` for anything else a LLaVA layout
    carries (LLaVA-OneVision's ``image_newline``).

    Derived from the model's structure, so the writer and the reader agree for
    any vision tower and language model.
    """
    from umbrella_core.model.umbrella import vision_tower

    llava = model.llava
    where = {id(module): name for name, module in model.named_modules()}
    # Most specific first: the embedders sit inside the vision tower.
    parts = [
        (where[id(module)] + ".", f"embedders.{name}.")
        for name, module in model.embeddings.embedders.items()
    ]
    parts += [
        (where[id(vision_tower(llava))] + ".", "vision."),
        (where[id(llava.model.multi_modal_projector)] + ".", "projector."),
    ]
    language = (
        where[id(model.language_model)] + ".",
        where[id(llava.get_output_embeddings())] + ".",
    )
    names = {}
    for name in model.state_dict():
        if name.startswith(language):
            continue
        prefix, part = next(
            ((p, part) for p, part in parts if name.startswith(p)), ("llava.", "other.")
        )
        names[name] = part + name.removeprefix(prefix)
    return names


def load_export(
    folder: Path,
    meta: dict[str, Any],
    assemble: Callable[[Any], Any],
) -> tuple[Any, Any, dict[str, Any]]:
    """:func:`~umbrella_core.model.build.load_checkpoint` of an ``umbrella export`` folder:
    ``(model, tokenizer, meta)``.

    ``assemble(llava)`` makes the UMBRELLA model around the LLaVA model (build.py's
    ``build_model`` with the saved modalities): handed in, so that this module
    need not import build.py.
    """
    from accelerate import init_empty_weights
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = export_config(folder, meta)
    language = folder / LANGUAGE_DIR
    try:
        lm = AutoModelForCausalLM.from_pretrained(language, local_files_only=True, dtype="float32")
        tokenizer = AutoTokenizer.from_pretrained(language, local_files_only=True)
        vision = load_file(str(folder / VISION_WEIGHTS))
    except (OSError, ValueError, SafetensorError) as exc:
        raise ModelError(f"{folder}: cannot read the exported model: {exc}") from None
    # The Llava shell's own language model would only be replaced: built
    # without weights (buffers kept real), it costs no memory.
    with init_empty_weights(include_buffers=False):
        llava = llava_class(config.model_type, str(folder))(config)
    llava.model.language_model = lm.get_decoder()
    llava.lm_head = lm.get_output_embeddings()
    model = assemble(llava)
    names = {out: name for name, out in vision_weight_names(model).items()}
    lacks, extra = sorted(set(names) - set(vision)), sorted(set(vision) - set(names))
    if lacks or extra:
        what = f"lacks {lacks[0]}" if lacks else f"holds {extra[0]}, which the model has not"
        raise misfit(folder, meta, ValueError(f"{VISION_WEIGHTS} {what}"))
    try:
        model.load_state_dict({names[k]: v for k, v in vision.items()}, strict=False, assign=True)
    except RuntimeError as exc:
        raise misfit(folder, meta, exc) from None
    empty = [n for n, p in model.named_parameters() if p.is_meta]
    if empty:
        raise ModelError(f"{folder}: the exported weights lack {empty[0]}")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, meta
