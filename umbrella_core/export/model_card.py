"""The model card (``README.md``) of an exported folder, and what it shows.

:func:`render_card` writes the card from the export's ``umbrella.json``: the
training data (studies, modalities and their geometry, subjects per split),
the training settings, the held-out evaluation table, how to load the model
with transformers alone or with UMBRELLA, and the plugins it needs. The
writer (:mod:`umbrella_core.export.folder`) gathers what the checkpoint itself
does not hold with :func:`held_out_results` (the run's or ``umbrella
evaluate``'s table), :func:`split_counts` (the run's ``split.tsv``) and
:func:`card_families` (how each metric family shows its metrics).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from umbrella_core.config import chosen_learning_rate
from umbrella_core.model.exported import CHECKPOINT_META, VISION_WEIGHTS

__all__ = ["CARD", "card_families", "held_out_results", "render_card", "split_counts"]

#: The model card's file name (what the Hugging Face hub shows).
CARD = "README.md"


# -- what the card shows -------------------------------------------------------


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def held_out_results(source: Path, meta: Mapping[str, Any]) -> tuple[dict | None, str]:
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


def split_counts(source: Path) -> dict[str, dict[str, int]] | None:
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


def card_families(plugin_manager: Any) -> list[Any]:
    """The installed metric families, to show each question's metrics as ``umbrella
    evaluate`` does; none if a plugin cannot give them (the card then shows every number)."""
    try:
        return list(plugin_manager.metric_families())
    except Exception:  # a broken metrics plugin must not stop an export: default rows
        return []


# -- rendering -----------------------------------------------------------------


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


def _metric_rows(
    question: Mapping[str, Any], families: Mapping[str, Any], metrics: Mapping | None = None
) -> list[tuple]:
    """The rows ``umbrella evaluate`` prints of a question's ``metrics`` (default: the VLM's)."""
    metrics = (question.get("metrics") or {}) if metrics is None else metrics
    name = question.get("family")
    family = None if name is None else families.get(name)
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
    baselines = _baselines_said(results)
    column = bool(baselines)  # a baseline column where any was fitted
    lines += [*baselines, *([""] if baselines else [])]
    rows, absent = [], []
    for key, r in results.items():
        loss = r.get("loss")
        loss = f"{loss:.4f}" if isinstance(loss, (int, float)) else "-"
        rows.append((key, "(all questions)", r.get("n", ""), "loss", loss, *[""] * column, ""))
        for question, q in (r.get("questions") or {}).items():
            head = (key, question, q.get("n", ""))
            shown = _metric_rows(q, by_name)
            cells = _baseline_cells(q, by_name, shown)
            for (label, value, reference), cell in zip(shown, cells, strict=True):
                rows.append((*head, label, value, *[cell] * column, reference))
                head = ("", "", "")  # the question once, its metrics below it
            entry = q.get("baseline") or {}
            if "absent" in entry:
                absent.append(f"- {key}, {question}: {entry['absent']}")
    header = ("modality", "question", "n", "metric", "value", *["baseline"] * column, "reference")
    lines += _table(header, rows)
    if absent:
        lines += ["", "No baseline beside:", "", *absent]
    return [*lines, ""]


#: Rows about the form of generated answers: a baseline's always end and parse.
_FORM_ROWS = frozenset({"ended", "parsed", "unparsed"})


def _baselines_said(results: Mapping[str, Any]) -> list[str]:
    """A sentence per baseline in the table: what it reads and how it was fitted."""
    said: dict[str | None, str] = {}  # by baseline name (None: an entry without one)
    for r in results.values():
        for q in (r.get("questions") or {}).values():
            entry = q.get("baseline") or {}
            if "metrics" in entry and entry.get("name") not in said:
                said[entry.get("name")] = (
                    f"The baseline column is `{entry.get('name')}`: a linear model (logistic "
                    "regression for categorical questions, ridge regression for numeric ones) "
                    f"on {entry.get('description') or 'simple image features'}, fitted on the "
                    "training split with its regularisation chosen on the validation split."
                )
    return list(said.values())


def _baseline_cells(
    question: Mapping[str, Any], families: Mapping[str, Any], rows: Sequence[tuple]
) -> list[str]:
    """The baseline's value beside each of the VLM's rows, matched by label."""
    entry = question.get("baseline") or {}
    if "metrics" not in entry:
        return [""] * len(rows)
    values = {row[0]: row[1] for row in _metric_rows(question, families, entry["metrics"])}
    return ["" if row[0] in _FORM_ROWS else values.get(row[0], "") for row in rows]


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
    rate = trainer.get("learning_rate")
    if rate is None and config:  # left to choose: as the run chose
        rate = chosen_learning_rate(model.get("language", ""), model.get("base", "tiny"))[0]
    if rate is not None:
        lines.append(f"- Learning rate: {rate:g}")
    if "seed" in trainer:
        lines.append(f"- Seed: {trainer['seed']}")
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
