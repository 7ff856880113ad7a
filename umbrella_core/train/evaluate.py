"""Held-out evaluation during training: what ``UmbrellaTrainer.evaluate`` does.

Each held-out question is scored by its metric family
(:mod:`umbrella_core.evaluation.engine`; the families come from the plugin
manager, so a plugin's family for its own tasks is asked first): few-valued
answers by the model's probability of each candidate answer and by its generated
answer, numbers and free text by greedy decoding, each with the reference a
reader compares it with. The metrics go to the log history and TensorBoard, the
figures to TensorBoard (:mod:`umbrella_core.evaluation.report` makes both). The
table at the end of a run and ``umbrella evaluate``'s are
:mod:`umbrella_core.evaluation.report`'s and
:mod:`umbrella_core.evaluation.checkpoint`'s.
"""

from __future__ import annotations

import time
from typing import Any

from umbrella_core.evaluation.engine import Evaluation, evaluate_dataset
from umbrella_core.evaluation.report import figures, question_id, summarize
from umbrella_core.types import StudyRecord

__all__ = ["item_records", "evaluate_trainer", "log_figures"]


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


def _tensorboard_writer(trainer: Any) -> Any:
    from transformers.integrations import TensorBoardCallback

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback) and callback.tb_writer is not None:
            return callback.tb_writer
    return None


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
    questions = trainer.questions
    with trainer.compute_loss_context_manager():
        evaluation = evaluate_dataset(
            trainer.model,
            dataset,
            trainer.data_collator,
            questions,
            batch_size=trainer.args.per_device_eval_batch_size,
            workers=trainer.args.dataloader_num_workers,
            max_samples=trainer.eval_max_samples,
            max_new_tokens=trainer.eval_max_new_tokens,
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
