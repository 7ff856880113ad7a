"""The last phase of a run: ``final/``, the metrics, the test table, the trackers.

``final/`` and ``metrics.json`` are written before the last evaluation: on a large
held-out set it can take long, and stopping it must not lose the trained weights.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from umbrella_core.plugins import PluginManager
from umbrella_core.train.prepared import Prepared

__all__ = ["finish", "describe_weights", "add_test_baselines"]


def finish(
    trainer: Any,
    best: Any,
    prep: Prepared,
    result: Any,
    out_dir: Path,
    pm: PluginManager,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Save ``final/`` (the best evaluated or the last weights), evaluate it on the test
    records, and report; returns the run's metrics (also in ``metrics.json``)."""
    from umbrella_core.train.trackers import describe_trackers, finish_trackers

    t = prep.config.trainer
    metrics: dict[str, Any] = {
        "train_loss": result.training_loss,
        "steps": result.global_step,
        "train_seconds": round(result.metrics.get("train_runtime", 0.0), 1),
        "final": _final_weights(trainer, best, prep, result, log),
    }
    if best is not None and best.best is not None:
        metrics["best"] = best.best
        if best.stopped_early_at is not None:
            metrics["stopped_early_at"] = best.stopped_early_at
    final_dir = out_dir / "final"
    trainer.run_meta = trainer.run_meta | {"metrics": metrics}
    # Through the Trainer: under ZeRO-3 it gathers the partitioned weights first.
    trainer.save_model(str(final_dir))
    if trainer.is_world_process_zero():
        _write_metrics(out_dir, metrics)
    test_metrics: dict[str, float] = {}
    test_set = prep.test_set if prep.test_set is not None else prep.eval_set
    if t.eval_strategy == "no":
        log(
            "no evaluation (trainer.eval_strategy=no); the table of the held-out records: "
            f"umbrella evaluate --checkpoint {final_dir}"
        )
    elif test_set is not None:
        test_metrics = _evaluate_final(trainer, prep, test_set, metrics, out_dir, pm, log)
    # The held-out table to MLflow / W&B too, then their runs end.
    finish_trackers(trainer, test_metrics, result.global_step)
    log(f"checkpoint:  {final_dir}")
    if "tensorboard" in t.report_to:
        logging_dir = out_dir / "tensorboard"
        log(f"tensorboard: {logging_dir}   (tensorboard --logdir {logging_dir})")
    for line in describe_trackers(trainer):
        log(line)
    return metrics


def _final_weights(
    trainer: Any, best: Any, prep: Prepared, result: Any, log: Callable[[str], None]
) -> dict[str, Any]:
    """What ``final/`` (and the table) holds: the last weights, or the best evaluated ones
    (loaded into the trainer's model here)."""
    from umbrella_core.train.callbacks import load_best_weights

    t = prep.config.trainer
    final: dict[str, Any] = {"weights": "last", "step": result.global_step}
    if best is None or best.best is None:
        return final
    if best.stopped_early_at is not None:
        log(f"early stopping at step {best.stopped_early_at}: no better {t.metric_for_best}")
    log(
        f"best checkpoint: {best.directory} (step {best.best['step']}, "
        f"{best.best['metric']} {best.best['value']:.4f})"
    )
    if t.load_best_at_end and prep.test_set is not prep.eval_set:
        load_best_weights(trainer, best.directory)
        return {"weights": "best", **best.best, "split": "validation"}
    if t.load_best_at_end:
        log(
            "final/ keeps the last weights (trainer.load_best_at_end): the studies have "
            "no validation split, and best/ was chosen on the held-out records reported below"
        )
    return final


def _evaluate_final(
    trainer: Any,
    prep: Prepared,
    test_set: Any,
    metrics: dict[str, Any],
    out_dir: Path,
    pm: PluginManager,
    log: Callable[[str], None],
) -> dict[str, float]:
    """The test table of ``final/``: printed, into ``metrics.json``, ``final/`` and
    TensorBoard; returns its flat metrics (none on the other ranks)."""
    from umbrella_core.evaluation.engine import evaluate_dataset
    from umbrella_core.evaluation.report import format_table, summarize

    t, main_process = prep.config.trainer, trainer.is_world_process_zero()
    log(f"evaluating final/ on {len(test_set)} {test_set.name} samples")
    with trainer.compute_loss_context_manager():
        evaluation = evaluate_dataset(
            prep.model,
            test_set,
            trainer.data_collator,
            trainer.questions,
            batch_size=t.batch_size,
            workers=prep.config.data.workers,
            max_new_tokens=t.eval_max_new_tokens,
            progress=t.progress and main_process,
            description=f"evaluating {test_set.name}",
        )
    if main_process:
        add_test_baselines(evaluation, prep, test_set, trainer.questions, pm, log)
    metrics["held_out"] = evaluation.results
    metrics["held_out_split"] = test_set.name
    log(f"{test_set.name} answers of final/ = {describe_weights(metrics['final'])}:")
    log(format_table(evaluation))
    if not main_process:
        return {}
    _record_in_final(out_dir / "final", metrics)
    _write_metrics(out_dir, metrics)
    test_metrics = summarize(evaluation.results, "test")
    if "tensorboard" in t.report_to:
        from torch.utils.tensorboard import SummaryWriter

        from umbrella_core.train.evaluate import log_figures

        step = trainer.state.global_step
        with SummaryWriter(str(out_dir / "tensorboard")) as writer:
            for name, value in test_metrics.items():
                writer.add_scalar(name.replace("_", "/", 1), value, step)
            log_figures(writer, evaluation, step, "test")
    return test_metrics


def _write_metrics(out_dir: Path, metrics: dict[str, Any]) -> None:
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")


def _record_in_final(final_dir: Path, metrics: dict[str, Any]) -> None:
    """The metrics into ``final/``'s ``umbrella.json`` (its model card reads them)."""
    from umbrella_core.model.exported import CHECKPOINT_META

    meta_path = final_dir / CHECKPOINT_META
    meta = json.loads(meta_path.read_text())
    meta["metrics"] = metrics
    written = meta_path.with_name(f".{CHECKPOINT_META}.tmp")
    written.write_text(json.dumps(meta, indent=2, default=str) + "\n")
    os.replace(written, meta_path)  # a reader never sees half of it


def add_test_baselines(
    evaluation: Any,
    prep: Prepared,
    test_set: Any,
    questions: dict[str, Any],
    pm: PluginManager,
    log: Callable[[str], None],
) -> None:
    """The simple baseline beside each figure of the test table (``evaluation.baselines``).

    Fitted on the training sets, chosen on the validation set (none where the
    held-out records are one set, as the table's), on the main process only:
    the other ranks have no table to print. A baseline that fails (a plugin's
    bad features) is said in one line and leaves the VLM's table as it is:
    the run's weights and figures are worth more than the comparison.
    """
    from umbrella_core.errors import UmbrellaError
    from umbrella_core.evaluation.baselines import add_baselines, baseline_mode

    mode = baseline_mode(prep.config.evaluation)
    if mode == "off":
        return
    try:
        add_baselines(
            evaluation,
            test_set=test_set,
            train_sets=prep.train_sets,
            validation_set=prep.eval_set if prep.eval_set is not test_set else None,
            questions=questions,
            baselines=pm.baselines(),
            mode=mode,
            workers=prep.config.data.workers,
            log=log,
        )
    except UmbrellaError as exc:
        log(f"no baselines: {exc}")


def describe_weights(final: dict[str, Any]) -> str:
    """Which weights ``final/`` holds, for the line above the table at the end of a run."""
    if final["weights"] == "best":
        return (
            f"best evaluated weights, step {final['step']}, {final['metric']} "
            f"{final['value']:.4f} on {final['split']}"
        )
    return f"last weights, step {final['step']}"
