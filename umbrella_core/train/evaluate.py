"""Held-out evaluation of a run: during training, at its end, and of a saved checkpoint.

Each held-out question is scored by its metric family
(:mod:`umbrella_core.evaluation.engine`): few-valued answers by the model's
probability of each candidate answer (accuracy, balanced accuracy, macro-F1,
confusion matrix, AUROC), numbers by greedy decoding (MAE, RMSE, Pearson r, R²,
share unparsed), free text by greedy decoding (BLEU, ROUGE-L, exact match),
each with the reference a reader compares it with (chance, the majority
class, the error of always answering the training mean). Every question's
answer is also generated as ``umbrella generate`` prints it: categorical
questions are scored by it too, every question says how many answers ended
within their token budget and parsed, and a question whose answers did not
end is flagged under the table (:func:`flag_lines`).

Used three ways: during training (:func:`evaluate_trainer`, behind
``UmbrellaTrainer.evaluate``: metrics to the log history and TensorBoard,
figures to TensorBoard), after training (the table ``umbrella train`` prints)
and on a saved checkpoint (``umbrella evaluate``, :func:`evaluate_checkpoint`,
which also writes the figures as PNG files and every answer to
``predictions.jsonl``).

The table at the end of training and ``umbrella evaluate``'s also hold a
simple baseline beside each figure (:mod:`umbrella_core.evaluation.baselines`):
:func:`format_table` shows it as a ``baseline`` column, matched to the VLM's
rows by label, :func:`summarize` as ``<prefix>_baseline_<metric>/...``, and
:func:`figures` draws its figure after the VLM's.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from umbrella_core.evaluation.engine import (
    Evaluation,
    Question,
    evaluate_dataset,
    index_questions,
)
from umbrella_core.types import MetricFamily, QuestionAnswers, StudyRecord

__all__ = [
    "question_id",
    "item_records",
    "run_questions",
    "summarize",
    "evaluate_trainer",
    "evaluate_checkpoint",
    "write_report",
    "format_table",
    "flag_lines",
]


def item_records(dataset: Any) -> list[StudyRecord]:
    """The record of each item of a :class:`RecordDataset` or a ``ConcatDataset`` of them.

    Other datasets give an empty list (their items are not known as records).
    """
    if hasattr(dataset, "datasets"):  # torch ConcatDataset
        out: list[StudyRecord] = []
        for part in dataset.datasets:
            out.extend(item_records(part))
        return out
    if hasattr(dataset, "records") and hasattr(dataset, "items"):
        return [dataset.records[index] for index, _ in dataset.items]
    return []


def _builtin_families() -> list[MetricFamily]:
    from umbrella_core.default_plugins.metrics import umbrella_metrics

    return umbrella_metrics()


def run_questions(
    *datasets: Any, families: Sequence[MetricFamily] | None = None
) -> dict[str, Question]:
    """The questions of the records of ``datasets`` (None entries skipped), each with its
    family (default: the built-in ones)."""
    records: list[StudyRecord] = []
    parts = list(datasets)
    while parts:
        dataset = parts.pop(0)
        if hasattr(dataset, "datasets"):  # torch ConcatDataset
            parts[:0] = list(dataset.datasets)
        elif dataset is not None:
            # Records, not items: a series cut into windows is one answer.
            records.extend(getattr(dataset, "records", ()))
    return index_questions(records, families if families is not None else _builtin_families())


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


def _tensorboard_writer(trainer: Any) -> Any:
    from transformers.integrations import TensorBoardCallback

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback) and callback.tb_writer is not None:
            return callback.tb_writer
    return None


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


def log_figures(writer: Any, evaluation: Evaluation, step: int, prefix: str = "eval") -> None:
    """Each question's figure to TensorBoard (``eval/t1/which_hemisphere_holds_the_lesion``)."""
    for answers, _, figure, kind in figures(evaluation):
        tag = f"{prefix}/{answers.modality_key}/{question_id(answers.question)}"
        tag += f"/{kind}" if kind else ""
        writer.add_figure(tag, figure, step, close=True)
    writer.flush()


def evaluate_trainer(
    trainer: Any, eval_dataset: Any = None, *, metric_key_prefix: str = "eval"
) -> dict[str, float]:
    """``UmbrellaTrainer.evaluate``: per-modality held-out loss and each question's metrics.

    Every rank evaluates the whole held-out set (or ``trainer.eval_max_samples``
    of it; the same forward passes in the same order, as DeepSpeed ZeRO-3
    needs); the metrics go to the log history and TensorBoard through
    ``Trainer.log`` (``eval/loss/t1``, ``eval/accuracy``, ``eval/mae/t1/...``),
    the figures to TensorBoard, and the metrics to the callbacks'
    ``on_evaluate`` (best checkpoint, early stopping, generated samples).
    """
    dataset = eval_dataset if eval_dataset is not None else trainer.eval_dataset
    started = time.perf_counter()
    questions = getattr(trainer, "questions", None)
    if questions is None:
        questions = run_questions(trainer.train_dataset, dataset)
    with trainer.compute_loss_context_manager():
        evaluation = evaluate_dataset(
            trainer.model,
            dataset,
            trainer.data_collator,
            questions,
            batch_size=trainer.args.per_device_eval_batch_size,
            workers=trainer.args.dataloader_num_workers,
            max_samples=getattr(trainer, "eval_max_samples", 0),
            max_new_tokens=getattr(trainer, "eval_max_new_tokens", 128),
            progress=not trainer.args.disable_tqdm and trainer.is_world_process_zero(),
        )
    metrics = summarize(evaluation.results, metric_key_prefix)
    metrics[f"{metric_key_prefix}_runtime"] = round(time.perf_counter() - started, 3)
    # The log (console, log history) gets the per-modality figures; each
    # question's metrics, a dozen per question, go to TensorBoard only.
    trainer.log({k: v for k, v in metrics.items() if k.count("/") < 2})
    writer = _tensorboard_writer(trainer) if trainer.is_world_process_zero() else None
    if writer is not None:
        step = trainer.state.global_step
        for name, value in metrics.items():
            if name.count("/") >= 2:
                writer.add_scalar(name.replace("_", "/", 1), value, step)
        log_figures(writer, evaluation, step, metric_key_prefix)
    trainer.control = trainer.callback_handler.on_evaluate(
        trainer.args, trainer.state, trainer.control, metrics=metrics
    )
    return metrics


def evaluate_checkpoint(
    checkpoint: str,
    pm: Any,
    *,
    studies: Sequence[str] = (),
    split: str = "test",
    batch_size: int | None = None,
    max_samples: int = 0,
    progress: bool = False,
    log: Callable[[str], None] = print,
) -> Evaluation:
    """``umbrella evaluate``: a checkpoint's answers on a split of its studies, scored.

    Studies are the checkpoint's own (from the run configuration it stores;
    the built-in demo is written again exactly as training wrote it) unless
    ``studies`` names others. ``split`` is ``test``, ``validation``, ``train``
    or ``held-out`` (everything but ``train``). The simple baseline beside each
    figure (``evaluation.baselines``) is fitted on the studies' ``train``
    records and chosen on their ``validation`` records, read as the run read
    them (geometry, preprocessing, cache), unless they are the split evaluated.
    """
    import attrs

    from umbrella_core.config import StudyConfig
    from umbrella_core.data.collate import UmbrellaCollator
    from umbrella_core.data.dataset import RecordDataset
    from umbrella_core.data.split_table import split_file_of_checkpoint
    from umbrella_core.data.studies import read_studies
    from umbrella_core.errors import DataError, ModelError
    from umbrella_core.inference.generate import load_for_inference
    from umbrella_core.model.chat import chat_format

    loaded = load_for_inference(checkpoint, pm)
    config = loaded.config
    if studies:
        config = attrs.evolve(
            config,
            data=attrs.evolve(config.data, studies=tuple(StudyConfig(location=s) for s in studies)),
        )
    else:
        written = split_file_of_checkpoint(checkpoint)
        if written is not None and not config.data.split.file:
            # The run's own split, as it was written: the same test subjects.
            log(f"split of the run: {written}")
            sides = attrs.evolve(config.data.split, file=str(written))
            config = attrs.evolve(config, data=attrs.evolve(config.data, split=sides))
    data = read_studies(config, pm, log=log)
    for name, spec in data.specs.items():
        have = loaded.specs.get(name)
        if have is None or have.input_shape != spec.input_shape:
            raise ModelError(
                f"{checkpoint}: the checkpoint's {name} input is "
                f"{have.input_shape if have else 'absent'}, its run configuration gives "
                f"{spec.input_shape}"
            )
    wanted = [
        r for r in data.records if (r.split != "train" if split == "held-out" else r.split == split)
    ]
    if not wanted:
        present = sorted({str(r.split) for r in data.records})
        raise DataError(
            f"no record of split {split!r} in {', '.join(data.locations)} "
            f"(splits there: {', '.join(present)})"
        )
    model = loaded.model
    dataset = RecordDataset(
        wanted,
        loaded.specs,
        tokenizer=loaded.tokenizer,
        image_token_id=model.image_token_id,
        max_length=config.model.max_length,
        name=split,
        # The checkpoint's tokenizer carries its chat template: "auto" finds it.
        chat=chat_format(loaded.tokenizer, "auto", config.model.system_prompt),
        frames=data.header_index.frames if data.header_index is not None else None,
    )
    if config.data.workers:
        dataset.pack()  # forked workers then copy none of the records' pages
    collator = UmbrellaCollator(loaded.tokenizer.pad_token_id, tuple(model.specs))
    questions = index_questions(data.records, pm.metric_families(config.evaluation))
    evaluation = evaluate_dataset(
        model,
        dataset,
        collator,
        questions,
        batch_size=batch_size or config.trainer.batch_size,
        workers=config.data.workers,
        max_samples=max_samples,
        max_new_tokens=config.trainer.eval_max_new_tokens,
        progress=progress,
        description=f"evaluating {split}",
    )
    _checkpoint_baselines(
        evaluation, dataset, split, questions, loaded, config, data, pm, max_samples, log
    )
    return evaluation


def _checkpoint_baselines(
    evaluation: Evaluation,
    dataset: Any,
    split: str,
    questions: dict[str, Question],
    loaded: Any,
    config: Any,
    data: Any,
    pm: Any,
    max_samples: int,
    log: Callable[[str], None],
) -> None:
    """``umbrella evaluate``'s baselines: fitted on the run's training records, chosen on its
    validation records (neither when it is the split evaluated), read as the run read them."""
    from umbrella_core.data.dataset import RecordDataset
    from umbrella_core.evaluation.baselines import add_baselines, baseline_mode

    mode = baseline_mode(config.evaluation)
    if mode == "off":
        return
    cache = None
    if config.data.cache:
        from umbrella_core.data.cache import PreprocessedCache, default_cache_root

        root = config.data.cache_dir or default_cache_root()
        cache = PreprocessedCache(root, data.versions(), dtype=config.data.cache_dtype)

    def side(name: str) -> Any:
        records = [r for r in data.records if r.split == name]
        if not records:
            return None
        return RecordDataset(
            records,
            loaded.specs,
            tokenizer=loaded.tokenizer,
            image_token_id=loaded.model.image_token_id,
            max_length=config.model.max_length,
            name=name,
            cache=cache,
            frames=data.header_index.frames if data.header_index is not None else None,
        )

    train = side("train") if split != "train" else None
    add_baselines(
        evaluation,
        test_set=dataset,
        train_sets=[train] if train is not None else [],
        validation_set=side("validation") if split not in ("validation", "held-out") else None,
        questions=questions,
        baselines=pm.baselines(),
        mode=mode,
        max_samples=max_samples,
        workers=config.data.workers,
        log=log,
    )


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
    families: Sequence[MetricFamily] | None = None,
) -> str:
    """Per modality key: its samples and loss, then per question its metrics and references."""
    results = evaluation.results if isinstance(evaluation, Evaluation) else evaluation
    by_name = {f.name: f for f in (families if families is not None else _builtin_families())}
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


def _health_rows_missing(
    rows: Sequence[tuple[str, str, str]], metrics: dict[str, Any]
) -> list[tuple[str, str, str]]:
    """``ended`` and ``parsed`` rows where a plugin family's table leaves them out."""
    from umbrella_core.default_plugins.metrics import health_rows

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
    given = _default_rows(entry["metrics"])
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
