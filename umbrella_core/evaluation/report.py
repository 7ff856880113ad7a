"""What an evaluation says, for people and for logs: the table, flat metrics, figures, files.

An :class:`~umbrella_core.evaluation.engine.Evaluation` (each held-out question scored
by its metric family) becomes the table ``umbrella train`` and ``umbrella evaluate``
print (:func:`format_table`: per modality its loss, per question its metrics with
the reference a reader compares them with, and a ``baseline`` column matched to the
VLM's rows by label where a simple baseline was fitted), flat metrics for the log and
TensorBoard (:func:`summarize`: ``eval_mae/t1/how_old_is_the_subject``, the
baseline's as ``eval_baseline_mae/...``), figures (:func:`figures`: each family's,
then its baseline's) and files (:func:`write_report`: ``metrics.json``,
``predictions.jsonl``, one PNG per figure). A question whose generated answers did
not end is flagged under the table (:func:`flag_lines`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from umbrella_core.evaluation.engine import Evaluation
from umbrella_core.types import MetricFamily, QuestionAnswers

__all__ = [
    "question_id",
    "summarize",
    "figures",
    "write_report",
    "format_table",
    "flag_lines",
    "health_rows",
]


def question_id(question: str, width: int = 40) -> str:
    """A question as a metric-name part: ``which_hemisphere_holds_the_lesion``."""
    words = re.findall(r"[a-z0-9]+", question.lower())
    out = ""
    for word in words:
        if len(out) + len(word) + 1 > width:
            break
        out = f"{out}_{word}" if out else word
    return out or "question"


def summarize(results: dict[str, dict[str, Any]], prefix: str = "eval") -> dict[str, float]:
    """Flat metrics for logs and TensorBoard.

    ``{prefix}_loss`` over all samples, ``{prefix}_accuracy`` (the most probable
    candidate) and ``{prefix}_generated_accuracy`` (the generated answer) over
    the samples of categorical questions; per key ``{prefix}_loss/<key>``,
    ``{prefix}_accuracy/<key>`` and ``{prefix}_generated_accuracy/<key>``; per
    key and question every numeric metric as ``{prefix}_<metric>/<key>/<question
    id>`` (``eval_mae/t1/how_old_is_the_subject``, ``eval_ended/t1/...``), and
    the baseline's beside it as ``{prefix}_baseline_<metric>/<key>/<question id>``.
    """
    metrics: dict[str, float] = {}
    n = sum(r["n"] for r in results.values())
    scored = sum(r["scored"] for r in results.values())
    if n:
        metrics[f"{prefix}_loss"] = sum(r["loss"] * r["n"] for r in results.values()) / n
    for name in ("accuracy", "generated_accuracy"):
        weighted = [(r[name], r["scored"]) for r in results.values() if r.get(name) is not None]
        if scored and weighted:
            metrics[f"{prefix}_{name}"] = sum(v * k for v, k in weighted) / scored
    for key, r in results.items():
        metrics[f"{prefix}_loss/{key}"] = r["loss"]
        for name in ("accuracy", "generated_accuracy"):
            if r.get(name) is not None:
                metrics[f"{prefix}_{name}/{key}"] = r[name]
        for question, q in r.get("questions", {}).items():
            qid = question_id(question)
            for name, value in q["metrics"].items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and name != "n":
                    metrics[f"{prefix}_{name}/{key}/{qid}"] = float(value)
            baseline = (q.get("baseline") or {}).get("metrics") or {}
            for name, value in baseline.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and name != "n":
                    metrics[f"{prefix}_baseline_{name}/{key}/{qid}"] = float(value)
    return metrics


def figures(
    evaluation: Evaluation,
) -> Iterator[tuple[QuestionAnswers, MetricFamily, Any, str]]:
    """Each question's figure (confusion matrix, predicted vs true), where its family draws one,
    then its baseline's (the same figure of the baseline's answers), each with ``""`` or
    ``"baseline"``."""
    for answers, family in zip(evaluation.answers, evaluation.families, strict=True):
        if family.figure is None:
            continue
        metrics = evaluation.results[answers.modality_key]["questions"][answers.question]
        figure = family.figure(answers, metrics["metrics"])
        if figure is not None:
            yield answers, family, figure, ""
        baseline = evaluation.baselines.get((answers.modality_key, answers.question))
        if baseline is not None:
            entry = metrics["baseline"]
            figure = family.figure(baseline, entry["metrics"])
            if figure is not None:
                figure.suptitle(f"baseline {entry['name']}: {entry['model']}", fontsize="medium")
                yield baseline, family, figure, "baseline"


def write_report(evaluation: Evaluation, folder: str | Path) -> dict[str, Any]:
    """``metrics.json``, ``predictions.jsonl`` and one PNG per figure into ``folder``.

    Returns what was written: ``{"metrics": path, "predictions": path, "figures": [paths]}``.
    """
    from umbrella_core.evaluation.figures import save_figure

    folder = Path(folder)
    (folder / "figures").mkdir(parents=True, exist_ok=True)
    metrics_path = folder / "metrics.json"
    metrics_path.write_text(json.dumps(evaluation.results, indent=2) + "\n")
    predictions = folder / "predictions.jsonl"
    with predictions.open("w") as out:
        for sample in evaluation.samples:
            out.write(json.dumps(sample) + "\n")
    saved: list[Path] = []
    for answers, family, figure, kind in figures(evaluation):
        name = f"{answers.modality_key}-{question_id(answers.question)}-{family.name}"
        name += f"-{kind}.png" if kind else ".png"
        saved.append(save_figure(figure, folder / "figures" / name))
    return {"metrics": metrics_path, "predictions": predictions, "figures": saved}


def _default_rows(metrics: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [
        (name, f"{value:.4g}", "")
        for name, value in metrics.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and name != "n"
    ]


def format_table(
    evaluation: Evaluation | dict[str, dict[str, Any]],
    families: Sequence[MetricFamily] = (),
) -> str:
    """Per modality key: its samples and loss, then per question its metrics and references.

    An :class:`Evaluation` knows its questions' families; plain ``results`` (a
    ``metrics.json``) are shown with ``families`` (the plugin manager's
    ``metric_families()``), each question's metrics as plain numbers where its family
    is not among them.
    """
    results = evaluation.results if isinstance(evaluation, Evaluation) else evaluation
    by_name = {f.name: f for f in families}
    if isinstance(evaluation, Evaluation):
        by_name.update({f.name: f for f in evaluation.families})
    column = _has_baselines(results)  # the baseline column, where any was fitted
    baseline = f"{'baseline':>9}  " if column else ""
    header = f"{'modality':<10}{'question':<42}{'n':>6}  {'metric':<19}{'value':>9}  "
    lines = [*_baseline_header(results), f"{header}{baseline}reference"]
    for key, r in results.items():
        lines.append(f"{key:<10}{'(all questions)':<42}{r['n']:>6}  {'loss':<19}{r['loss']:>9.4f}")
        for question, q in r.get("questions", {}).items():
            family = by_name.get(q["family"])
            rows = (
                family.table(q["metrics"])
                if family is not None and family.table is not None
                else _default_rows(q["metrics"])
            )
            rows = [*rows, *_health_rows_missing(rows, q["metrics"])]
            shown = question if len(question) <= 40 else question[:39] + "…"
            cells = _baseline_cells(family, q, rows)
            for i, (label, value, reference) in enumerate(rows):
                head = f"{'':<10}{shown:<42}{q['n']:>6}" if i == 0 else " " * 58
                cell = f"{cells[i]:>9}  " if column else ""
                lines.append(f"{head}  {label:<19}{value:>9}  {cell}{reference}".rstrip())
            lines += _baseline_absent(q)
    lines += flag_lines(results)
    return "\n".join(lines)


def health_rows(m: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """The table rows of the generated answers' ``ended`` and ``parsed`` shares, where known."""
    return [
        (name, "-" if m[name] is None else f"{m[name]:.1%}", "")
        for name in ("ended", "parsed")
        if m.get(name) is not None
    ]


def _health_rows_missing(
    rows: Sequence[tuple[str, str, str]], metrics: dict[str, Any]
) -> list[tuple[str, str, str]]:
    """``ended`` and ``parsed`` rows where a plugin family's table leaves them out."""
    shown = {label for label, _, _ in rows}
    return [row for row in health_rows(metrics) if row[0] not in shown]


def flag_lines(results: dict[str, dict[str, Any]]) -> list[str]:
    """One line per question whose generated answers did not end (its ``flag``), for under
    the table: ``! t1 "Which hemisphere holds the lesion?": 41 of 48 generated answers ...``."""
    return [
        f'! {key} "{question}": {q["flag"]}'
        for key, r in results.items()
        for question, q in r.get("questions", {}).items()
        if q.get("flag")
    ]


# -- the baseline column ----------------------------------------------------------

#: Rows about the form of generated answers: a baseline's always end and parse.
_FORM_ROWS = frozenset({"ended", "parsed", "unparsed"})


def _has_baselines(results: dict[str, dict[str, Any]]) -> bool:
    return any(
        "metrics" in (q.get("baseline") or {})
        for r in results.values()
        for q in r.get("questions", {}).values()
    )


def _baseline_header(results: dict[str, dict[str, Any]]) -> list[str]:
    """One line per baseline in the table: its models, what they read, how they were fitted."""
    fitted: dict[str, tuple[str, dict[str, str]]] = {}
    for r in results.values():
        for q in r.get("questions", {}).values():
            entry = q.get("baseline") or {}
            if "metrics" in entry:
                _, models = fitted.setdefault(entry["name"], (entry.get("description", ""), {}))
                parameter = (entry.get("regularisation") or {}).get("parameter", "")
                models[entry.get("model", "linear model")] = parameter
    return [
        f"baseline {name}: "
        + ", ".join(f"{model} ({parameter})" for model, parameter in sorted(models.items()))
        + (f" on {description}" if description else "")
        + "; fitted on the training split, regularisation chosen on the validation split"
        for name, (description, models) in fitted.items()
    ]


def _baseline_cells(
    family: MetricFamily | None, q: dict[str, Any], rows: Sequence[tuple[str, str, str]]
) -> list[str]:
    """The baseline's value for each of the VLM's rows, matched by label ("" where none)."""
    entry = q.get("baseline") or {}
    if "metrics" not in entry:
        return [""] * len(rows)
    given: Sequence[tuple[str, str, str]] = _default_rows(entry["metrics"])
    if family is not None and family.table is not None:
        try:
            given = family.table(entry["metrics"])
        except Exception:  # a plugin's table made for the VLM's metrics alone: every number
            pass
    values = {label: value for label, value, _ in given}
    return ["" if label in _FORM_ROWS else values.get(label, "") for label, _, _ in rows]


def _baseline_absent(q: dict[str, Any]) -> list[str]:
    """The line under a question whose baseline is absent, saying why."""
    entry = q.get("baseline") or {}
    if "absent" not in entry:
        return []
    name = f" {entry['name']}" if entry.get("name") else ""
    return [f"{'':<58}  (baseline{name}: {entry['absent']})"]
