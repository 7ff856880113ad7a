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
embedder code), so the whole model is UMBRELLA's to load. The reader lives in
:mod:`umbrella_core.model.build`, beside the checkpoint reader.

The folder is written aside and renamed into place: a failed export leaves
nothing, and with ``overwrite`` the earlier folder stays whole until the new one
is complete.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from umbrella_core.errors import ConfigError, ModelError
from umbrella_core.model.build import (
    CHECKPOINT_META,
    EXPORT_FORMAT,
    LANGUAGE_DIR,
    VISION_WEIGHTS,
    _core_version,
    load_checkpoint,
    merge_lora,
    vision_weight_names,
)

__all__ = ["CARD", "export_checkpoint", "language_causal_lm", "render_card"]

#: The model card's file name (what the Hugging Face hub shows).
CARD = "README.md"

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
        overwrite: Replace a non-empty ``target``.

    Returns:
        ``(folder, merged)``: the written folder, and whether LoRA adapters were merged.

    Raises:
        ModelError: ``target`` is ``source`` or holds it; ``source`` does not load.
        ConfigError: ``target`` is not empty (or not a folder) and ``overwrite`` is off.
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
    evaluation, evaluated = _evaluation(source, meta)
    subjects = meta.get("subjects") or _subjects(source)
    with _written_whole(target) as tmp:
        _write_language(model, tokenizer, meta, tmp / LANGUAGE_DIR)
        _write_vision(model, tmp / VISION_WEIGHTS)
        exported = _export_meta(model, meta, source, lora, evaluation, evaluated, subjects)
        (tmp / CHECKPOINT_META).write_text(json.dumps(exported, indent=2, default=str) + "\n")
        card = render_card(exported, name=target.name, families=_families(plugin_manager))
        (tmp / CARD).write_text(card, encoding="utf-8")
    return target, lora is not None


def _check_target(target: Path, overwrite: bool) -> None:
    if not target.exists() and not target.is_symlink():
        return
    if not target.is_dir():
        raise ConfigError(f"{target}: exists and is not a folder; give a new folder to export to")
    if any(target.iterdir()) and not overwrite:
        raise ConfigError(
            f"{target}: the folder is not empty; give a new one, or --overwrite to replace it"
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
        if target.exists():
            # Set aside, not deleted first: a crash between the renames keeps a whole folder.
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old)
        else:
            tmp.rename(target)
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
    out["umbrella_core"] = _core_version()
    return out


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _evaluation(source: Path, meta: Mapping[str, Any]) -> tuple[dict | None, str]:
    """The held-out table of ``source`` and where it came from, or ``(None, "")``.

    In order: an earlier export's, the one the run stored in the checkpoint
    (``umbrella.json`` ``metrics.held_out``), the run folder's ``metrics.json``
    (only for its ``final/``, the weights it describes), then what ``umbrella
    evaluate`` wrote into the checkpoint (``evaluation-test/`` first).
    """
    stored = meta.get("evaluation")
    if isinstance(stored, Mapping) and stored.get("results"):
        return dict(stored["results"]), str(stored.get("source", ""))
    metrics = meta.get("metrics")
    if isinstance(metrics, Mapping) and metrics.get("held_out"):
        split = metrics.get("held_out_split", "held-out")
        return dict(metrics["held_out"]), f"the run's table of its {split} records"
    if source.name == "final":
        run = _read_json(source.parent / "metrics.json")
        if isinstance(run, Mapping) and run.get("held_out"):
            split = run.get("held_out_split", "held-out")
            return dict(run["held_out"]), f"the run's table of its {split} records"
    reports = sorted(source.glob("evaluation-*/metrics.json"))
    reports.sort(key=lambda p: p.parent.name != "evaluation-test")
    for path in reports:
        results = _read_json(path)
        if isinstance(results, Mapping) and results:
            split = path.parent.name.removeprefix("evaluation-")
            return dict(results), f"umbrella evaluate on the {split} split ({path.parent.name}/)"
    return None, ""


def _subjects(source: Path) -> dict[str, dict[str, int]] | None:
    """Subjects per study and side, from the run's ``split.tsv`` (counts only: the ids
    stay with the run, not in a folder meant to be shared)."""
    from umbrella_core.data.split_table import SplitTable, split_file_of_checkpoint
    from umbrella_core.errors import DataError

    path = split_file_of_checkpoint(source)
    if path is None:
        return None
    try:
        table = SplitTable.read(path)
    except DataError:
        return None
    counts: dict[str, dict[str, int]] = {}
    for row in table.rows:
        study = counts.setdefault(row.study, {"train": 0, "validation": 0, "test": 0})
        study[row.split] += 1
    return counts


def _families(plugin_manager: Any) -> list[Any]:
    try:
        return list(plugin_manager.metric_families())
    except Exception:  # a broken metrics plugin must not stop an export: default rows
        return []


# -- the model card --------------------------------------------------------------


def _is_hub_id(name: str) -> bool:
    """Whether ``name`` reads as a hub id (``org/model``), not a path or ``tiny``."""
    if not name or name.startswith(("/", ".", "~")) or "\\" in name:
        return False
    return name.count("/") == 1 and not Path(name).expanduser().exists()


def _x(values: Sequence[Any]) -> str:
    return "x".join(map(str, values))


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _metric_rows(question: Mapping[str, Any], families: Mapping[str, Any]) -> list[tuple]:
    metrics = question.get("metrics") or {}
    family = families.get(question.get("family"))
    if family is not None and family.table is not None:
        try:
            return [tuple(row) for row in family.table(metrics)]
        except Exception:  # a family that cannot show these metrics: every number instead
            pass
    return [
        (name, f"{value:.4g}", "")
        for name, value in metrics.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    ]


def _evaluation_section(meta: Mapping[str, Any], families: Sequence[Any]) -> list[str]:
    lines = ["## Evaluation", ""]
    stored = meta.get("evaluation") or {}
    results = stored.get("results")
    if not results:
        lines.append(
            "Not evaluated: the checkpoint and its run hold no held-out table "
            "(`umbrella evaluate --checkpoint CHECKPOINT` makes one)."
        )
        return [*lines, ""]
    by_name = {f.name: f for f in families}
    lines += [f"From {stored.get('source') or 'the held-out records'}.", ""]
    rows = []
    for key, r in results.items():
        loss = r.get("loss")
        loss = f"{loss:.4f}" if isinstance(loss, (int, float)) else "-"
        rows.append((key, "(all questions)", r.get("n", ""), "loss", loss, ""))
        for question, q in (r.get("questions") or {}).items():
            head = (key, question, q.get("n", ""))
            for label, value, reference in _metric_rows(q, by_name):
                rows.append((*head, label, value, reference))
                head = ("", "", "")  # the question once, its metrics below it
    header = ("modality", "question", "n", "metric", "value", "reference")
    return [*lines, *_table(header, rows), ""]


def _data_section(meta: Mapping[str, Any]) -> list[str]:
    config = meta.get("config") or {}
    data = config.get("data") or {}
    # Without data.studies a run reads the demo it wrote (meta "studies" is then its cache).
    given = data.get("studies") if config else meta.get("studies")
    studies = [s.get("location", s) if isinstance(s, Mapping) else s for s in given or []]
    lines = ["## Training data", ""]
    if studies:
        lines += ["Studies (locations as given to `umbrella train`):", ""]
        lines += [f"- `{s}`" for s in studies]
    elif config:
        lines.append(
            "The built-in synthetic demo: phantom images with a known label "
            f"({data.get('demo_subjects', '?')} subjects per modality), not real scans."
        )
    else:
        lines.append("Not recorded in the checkpoint.")
    lines += ["", "Modalities:", ""]
    geometry = (meta.get("vision_metadata") or {}).get("modalities") or {}
    rows = []
    for m in meta["modalities"]:
        g = geometry.get(m["name"], {})
        shape = g.get("input_shape", [m["channels"], *m["shape"]])
        patch = m["patch_size"]
        rows.append((m["name"], _x(shape), _x(patch), g.get("num_tokens", "?")))
    lines += _table(("modality", "input (channels x shape)", "patch size", "image tokens"), rows)
    subjects = meta.get("subjects")
    if subjects:
        lines += ["", "Subjects per split (from the run's `split.tsv`):", ""]
        sides = ("train", "validation", "test")
        rows = [(study, *(c.get(s, 0) for s in sides)) for study, c in subjects.items()]
        if len(rows) > 1:
            rows.append(("all", *(sum(c.get(s, 0) for c in subjects.values()) for s in sides)))
        lines += _table(("study", *sides), rows)
    results = (meta.get("evaluation") or {}).get("results") or {}
    if results:
        held = ", ".join(f"{k}: {r.get('n', '?')}" for k, r in results.items())
        lines += ["", f"Held-out samples evaluated, per modality: {held}."]
    return [*lines, ""]


def _training_section(meta: Mapping[str, Any]) -> list[str]:
    config = meta.get("config") or {}
    model = config.get("model") or {}
    trainer = config.get("trainer") or {}
    metrics = meta.get("metrics") or {}
    lora = meta.get("lora_merged")
    lines = ["## Training", ""]
    if not config and not metrics:
        return [*lines, "Not recorded in the checkpoint.", ""]
    if model.get("language"):
        lines.append(
            f"- Language model: `{model['language']}`, composed with a "
            f"`{model.get('vision', 'fresh')}` vision body and a new projector"
        )
    else:
        base = meta.get("base_model") or model.get("base", "?")
        shown = "the built-in `tiny` model (random weights)" if base == "tiny" else f"`{base}`"
        lines.append(f"- Started from {shown}")
    trainable = meta.get("trainable") or model.get("trainable")
    if trainable:
        lines.append(f"- Trained parts: `{trainable}`")
    if lora:
        lines.append(
            f"- LoRA adapters (r={lora.get('r')}, alpha={lora.get('alpha')}, on "
            f"{', '.join(lora.get('target_modules', []))}), **merged** into `language/`: "
            "the exported weights hold no adapters"
        )
    steps = metrics.get("steps", trainer.get("max_steps"))
    if steps is not None:
        batch = f" (batch size {trainer['batch_size']})" if "batch_size" in trainer else ""
        lines.append(f"- Steps: {steps}{batch}")
    for key, label in (("learning_rate", "Learning rate"), ("seed", "Seed")):
        if key in trainer:
            lines.append(f"- {label}: {trainer[key]}")
    if trainer.get("bf16"):
        lines.append("- bf16 mixed precision")
    if config.get("stages"):
        lines.append(f"- Recipe: {len(config['stages'])} stages")
    final = metrics.get("final") or {}
    if final.get("weights") == "best":
        step, metric = final.get("step"), final.get("metric")
        lines.append(f"- Weights: the best evaluated ones ({metric} at step {step})")
    if isinstance(metrics.get("train_loss"), (int, float)):
        lines.append(f"- Final training loss: {metrics['train_loss']:.4f}")
    return [*lines, ""]


def render_card(meta: Mapping[str, Any], *, name: str, families: Sequence[Any] = ()) -> str:
    """The model card (``README.md``, Hugging Face style) of an exported folder.

    Args:
        meta: The export's ``umbrella.json``.
        name: The folder's name (the card's title, and the path in its examples).
        families: Metric families, to show their metrics as ``umbrella evaluate`` does.
    """
    config = meta.get("config") or {}
    model = config.get("model") or {}
    base = model.get("language") or model.get("base") or meta.get("base_model") or ""
    tags = ("medical-imaging", "brain-mri", "vision-language", "umbrella")
    front = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags:",
        *(f"- {t}" for t in tags),
        *([f"base_model: {base}"] if _is_hub_id(base) else []),
        "license: other",
        "---",
        "",
    ]
    modalities = [m["name"] for m in meta["modalities"]]
    image_token = (meta.get("vision_metadata") or {}).get("image_token_id", "?")
    lines = [
        f"# {name}",
        "",
        f"A brain-MRI vision-language model trained with UMBRELLA on {', '.join(modalities)}. "
        "Research use only: it is not a medical device and its answers are not a diagnosis.",
        "",
        *_table(
            ("file", "what"),
            [
                ("`language/`", "the language model: a plain transformers causal LM"),
                (
                    f"`{VISION_WEIGHTS}`",
                    f"the patch embedders, vision body and projector (image token {image_token})",
                ),
                (f"`{CHECKPOINT_META}`", "what UMBRELLA needs to put the whole model together"),
            ],
        ),
        "",
        "License: other (UMBRELLA does not know it): the base model's license and the terms "
        "of the studies' data apply.",
        "",
    ]
    lines += _data_section(meta)
    lines += _training_section(meta)
    lines += _evaluation_section(meta, families)
    lines += _use_section(meta, name, modalities)
    lines += ["## Plugins", ""]
    plugins = [
        (m["name"], m.get("plugin") or "-", m.get("distribution") or "-", m.get("version") or "-")
        for m in meta["modalities"]
    ]
    lines += _table(("modality", "plugin", "distribution", "version"), plugins)
    if meta.get("umbrella_core"):
        lines += ["", f"Exported with umbrella-core {meta['umbrella_core']}."]
    return "\n".join(front + lines).rstrip() + "\n"


def _use_section(meta: Mapping[str, Any], name: str, modalities: Sequence[str]) -> list[str]:
    results = (meta.get("evaluation") or {}).get("results") or {}
    asked = [q for r in results.values() for q in (r.get("questions") or {})]
    prompt = json.dumps(asked[0] if asked else "Describe the scan.")
    installs = sorted(
        {
            m["distribution"] + (f"=={m['version']}" if m.get("version") else "")
            for m in meta["modalities"]
            if m.get("distribution")
        }
    )
    merged = " (its LoRA adapters merged in)" if meta.get("lora_merged") else ""
    return [
        "## Use",
        "",
        f"The language model alone{merged}: text in, text out, with transformers only "
        "(no UMBRELLA, no peft):",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{name}/language")',
        f'tokenizer = AutoTokenizer.from_pretrained("{name}/language")',
        f'messages = [{{"role": "user", "content": {prompt}}}]',
        "inputs = tokenizer.apply_chat_template(",
        '    messages, add_generation_prompt=True, return_tensors="pt", return_dict=True',
        ")",
        "out = model.generate(**inputs, max_new_tokens=32)",
        'print(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
        "```",
        "",
        "The whole model, images included (UMBRELLA and each modality's plugin):",
        "",
        "```bash",
        " ".join(["pip install umbrella-core", *installs]),
        f"umbrella generate --checkpoint {name} --modality {modalities[0]} \\",
        f"    --image SCAN.nii.gz --prompt {prompt}",
        f"umbrella evaluate --checkpoint {name}   # the held-out table of its studies",
        "```",
        "",
    ]
