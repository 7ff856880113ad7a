"""Evaluation during training: when, the best checkpoint, early stopping, generated samples.

The evaluation itself is ``UmbrellaTrainer.evaluate``
(:func:`umbrella_core.train.evaluate.evaluate_trainer`); transformers calls it at
``trainer.eval_strategy`` (``epoch``, ``steps`` every ``trainer.eval_steps``,
or ``no``) and after the last step. The callbacks here act on its metrics:

* :class:`BestCheckpoint` keeps ``OUTPUT_DIR/best/`` at the best
  ``trainer.metric_for_best`` so far, and stops training after
  ``trainer.early_stopping_patience`` evaluations without improvement;
  :func:`load_best_weights` puts those weights back in the model at the end
  (``trainer.load_best_at_end``).
* :class:`GeneratedSamples` writes, for ``trainer.generate_samples`` held-out
  samples, the greedily generated answer beside the prompt and the reference
  (TensorBoard text) and mid-slices of the input images (TensorBoard image).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

from umbrella_core.errors import ConfigError

if TYPE_CHECKING:
    from umbrella_core.evaluation.engine import Question

__all__ = [
    "evaluation_arguments",
    "check_evaluation",
    "attach_evaluation",
    "BestCheckpoint",
    "load_best_weights",
    "GeneratedSamples",
    "mid_slices",
    "slice_panel",
]

BEST_DIR = "best"


def evaluation_arguments(trainer_config: Any) -> dict[str, Any]:
    """The ``TrainingArguments`` of evaluation, from the ``trainer`` section."""
    t = trainer_config
    if t.eval_strategy == "steps" and t.eval_steps < 0:
        raise ConfigError(f"trainer.eval_steps: must be positive, got {t.eval_steps}")
    if t.early_stopping_patience < 0:
        raise ConfigError(
            f"trainer.early_stopping_patience: must be 0 (off) or positive, "
            f"got {t.early_stopping_patience}"
        )
    if t.generate_samples < 0:
        raise ConfigError(f"trainer.generate_samples: must be 0 or more, got {t.generate_samples}")
    if t.eval_strategy in ("no", "end"):
        # "end": only the table after the last step, which train() makes itself.
        return {"eval_strategy": "no"}
    return {
        "eval_strategy": t.eval_strategy,
        # 0: every logging_steps (the transformers default).
        "eval_steps": t.eval_steps or None,
        "per_device_eval_batch_size": t.batch_size,
        "metric_for_best_model": t.metric_for_best,
        "greater_is_better": t.metric_for_best != "eval_loss",
    }


def check_evaluation(
    args: Any, prep: Any, questions: Mapping[str, Question], log: Callable[[str], None] = print
) -> bool:
    """Whether the run evaluates during training; turns evaluation off without held-out data.

    Raises:
        ConfigError: ``metric_for_best`` is ``eval_accuracy`` but no held-out
            question is closed-form (accuracy is not measured).
    """
    from transformers.trainer_utils import IntervalStrategy

    from umbrella_core.evaluation.engine import question_and_answer
    from umbrella_core.train.evaluate import item_records

    if args.eval_strategy == IntervalStrategy.NO:
        return False
    if prep.eval_set is None or len(prep.eval_set) == 0:
        log("no held-out records (split validation or test): no evaluation during training")
        args.eval_strategy = IntervalStrategy.NO
        args.metric_for_best_model = None
        return False
    if args.metric_for_best_model == "eval_accuracy":
        closed = {q for q, asked in questions.items() if asked.family.scoring == "candidates"}
        if not any(question_and_answer(r)[0] in closed for r in item_records(prep.eval_set)):
            raise ConfigError(
                "trainer.metric_for_best: eval_accuracy needs held-out questions with "
                "categorical answers (a few values, each given several times); "
                "these have numeric or free-form answers: use eval_loss"
            )
    return True


def attach_evaluation(trainer: Any, config: Any, prep: Any, out_dir: Path) -> BestCheckpoint:
    """Add the evaluation callbacks to ``trainer``; returns the best-checkpoint keeper."""
    t = config.trainer
    best = BestCheckpoint(
        t.metric_for_best,
        out_dir / BEST_DIR,
        patience=t.early_stopping_patience,
        save=trainer.save_model,
    )
    trainer.add_callback(best)
    if t.generate_samples > 0:
        trainer.add_callback(
            GeneratedSamples(prep.eval_set, prep.tokenizer, trainer, count=t.generate_samples)
        )
    return best


class BestCheckpoint(TrainerCallback):
    """Keeps the best checkpoint at ``directory`` and stops when the metric stops improving.

    Args:
        metric: ``eval_loss`` (lower is better) or ``eval_accuracy`` (higher).
        directory: Where the best checkpoint goes (``OUTPUT_DIR/best``).
        save: Writes a checkpoint to a folder; ``Trainer.save_model`` (called on
            every rank: under ZeRO-3 it gathers the weights first).
        patience: Evaluations without improvement before training stops; 0: never.

    ``best`` is ``{"step", "epoch", "metric", "value", "checkpoint"}`` of the
    best evaluation, ``stopped_early_at`` the step training was stopped at.
    A resumed run reads both back from the log history.
    """

    def __init__(
        self,
        metric: str,
        directory: str | Path,
        *,
        save: Callable[[str], None],
        patience: int = 0,
    ) -> None:
        self.metric = metric
        self.greater = not metric.endswith("loss")
        self.directory = Path(directory)
        self.save = save
        self.patience = int(patience)
        self.best: dict[str, Any] | None = None
        self.without_improvement = 0
        self.stopped_early_at: int | None = None

    def _improves(self, value: float) -> bool:
        if self.best is None:
            return True
        return value > self.best["value"] if self.greater else value < self.best["value"]

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # Resuming: the evaluations so far are in the restored log history.
        for entry in state.log_history:
            value = entry.get(self.metric)
            if value is None:
                continue
            if self._improves(value):
                self.best = self._record(entry.get("step", 0), entry.get("epoch"), value)
                self.without_improvement = 0
            else:
                self.without_improvement += 1

    def _record(self, step: int, epoch: float | None, value: float) -> dict[str, Any]:
        return {
            "step": int(step),
            "epoch": epoch,
            "metric": self.metric,
            "value": float(value),
            "checkpoint": str(self.directory),
        }

    def on_evaluate(
        self,
        args: Any,
        state: Any,
        control: Any,
        metrics: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        # TrainerCallback declares metrics among **kwargs: the handler always passes them.
        value = None if metrics is None else metrics.get(self.metric)
        if value is None:
            return
        if self._improves(value):
            self.best = self._record(state.global_step, state.epoch, value)
            self.without_improvement = 0
            self.save(str(self.directory))
            meta = self.directory / "umbrella.json"
            if state.is_world_process_zero and meta.is_file():
                data = json.loads(meta.read_text())
                data["best"] = self.best
                meta.write_text(json.dumps(data, indent=2, default=str) + "\n")
            return
        self.without_improvement += 1
        if self.patience and self.without_improvement >= self.patience:
            control.should_training_stop = True
            self.stopped_early_at = int(state.global_step)


def load_best_weights(trainer: Any, directory: str | Path) -> None:
    """Load the weights of the checkpoint in ``directory`` (``best/``) into ``trainer``'s model.

    Called on every rank once training has ended, as transformers'
    ``load_best_model_at_end`` does, so that ``final/`` and the table at the
    end are of the best evaluated weights. Under DeepSpeed ZeRO-3 the main
    process loads the gathered parameters and DeepSpeed partitions them again.
    """
    from safetensors.torch import load_model

    path = str(Path(directory) / "model.safetensors")
    # The main process may have written best/ at the very last step.
    trainer.accelerator.wait_for_everyone()
    model = trainer.accelerator.unwrap_model(trainer.model)
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    if trainer.is_deepspeed_enabled and plugin is not None and plugin.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0):
            if trainer.args.process_index == 0:
                load_model(model, path, strict=True)
        return
    load_model(model, path, strict=True)


class GeneratedSamples(TrainerCallback):
    """At each evaluation, the generated answers of ``count`` held-out samples in TensorBoard.

    The samples are the same at every evaluation (taken in turn from each
    modality key), so their answers can be followed through training. Text
    under ``samples/<i>`` (prompt, reference, generated), an image of the
    mid-slices of its input images under ``samples/<i>/images``. Generation
    runs on every rank (the same forward passes, as ZeRO-3 needs); the main
    process writes.
    """

    def __init__(self, dataset: Any, tokenizer: Any, trainer: Any, *, count: int = 4) -> None:
        self.dataset = dataset
        self.tokenizer = tokenizer
        self.trainer = trainer
        self.indices = pick_samples(dataset, count)

    def _writer(self) -> Any:
        from transformers.integrations import TensorBoardCallback

        for callback in self.trainer.callback_handler.callbacks:
            if isinstance(callback, TensorBoardCallback) and callback.tb_writer is not None:
                return callback.tb_writer
        return None

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        from umbrella_core.evaluation.engine import question_and_answer
        from umbrella_core.inference.generate import decode, greedy_generate, record_prompt

        model = kwargs.get("model") or self.trainer.model
        writer = self._writer() if state.is_world_process_zero else None
        eos = self.tokenizer.eos_token_id
        # Stop at the chat format's end-of-turn too (<|eot_id|>, <end_of_turn>, ...).
        chat = self.dataset.tokenization.chat
        for i, index in enumerate(self.indices):
            record = self.dataset.records[self.dataset.items[index][0]]
            _, reference = question_and_answer(record)
            prompt_ids, images = record_prompt(self.dataset, index)
            reference_ids = self.tokenizer(reference, add_special_tokens=False)["input_ids"]
            with self.trainer.compute_loss_context_manager():
                ids = greedy_generate(
                    model,
                    prompt_ids,
                    images,
                    max_new_tokens=min(256, 2 * len(reference_ids) + 8),
                    eos_token_id=eos,
                    stop_token_ids=chat.stop_token_ids,
                )
            if writer is None:
                continue
            generated = decode(self.tokenizer, ids)
            writer.add_text(
                f"samples/{i}",
                sample_markdown(record, reference, generated),
                state.global_step,
            )
            writer.add_image(
                f"samples/{i}/images",
                slice_panel([image.numpy() for _, image in images]),
                state.global_step,
                dataformats="HW",
            )
        if writer is not None:
            writer.flush()


def pick_samples(dataset: Any, count: int) -> list[int]:
    """``count`` item indices, taken in turn from each modality key (first-seen order)."""
    by_key: dict[str, list[int]] = {}
    for index, (record_index, _) in enumerate(dataset.items):
        by_key.setdefault(dataset.records[record_index].modality_key, []).append(index)
    picked: list[int] = []
    queues = [list(reversed(v)) for v in by_key.values()]
    while len(picked) < count and any(queues):
        for queue in queues:
            if queue and len(picked) < count:
                picked.append(queue.pop())
    return picked


def _cell(text: str) -> str:
    # TensorBoard renders Markdown and drops HTML, <image> included.
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return text.replace("|", "\\|").replace("\n", " ⏎ ")


def sample_markdown(record: Any, reference: str, generated: str) -> str:
    """A two-column Markdown table: the conversation up to the answer, reference, generated."""
    turns = list(record.turns)
    if turns and turns[-1].role == "assistant":
        turns = turns[:-1]
    prompt = "\n".join(f"{t.role.upper()}: {t.content}" for t in turns)
    verdict = "exact" if generated == reference else "differs"
    rows = [
        ("sample", f"{record.modality_key} · {record.subject} · {record.source}"),
        ("prompt", prompt),
        ("reference", reference),
        ("generated", f"{generated} ({verdict})"),
    ]
    return "| | |\n|---|---|\n" + "\n".join(f"| **{k}** | {_cell(v)} |" for k, v in rows)


def mid_slices(image: Any) -> list[Any]:
    """Axial, coronal and sagittal mid-slices of the first channel of a ``(C, X, Y, Z[, T])``
    image (a 4D series: its middle frame), rotated so that anterior/superior is up."""
    import numpy as np

    volume = np.asarray(image)[0]
    if volume.ndim == 4:
        volume = volume[..., volume.shape[-1] // 2]
    if volume.ndim != 3:
        raise ValueError(f"expected a (C, X, Y, Z[, T]) image, got shape {np.shape(image)}")
    x, y, z = (s // 2 for s in volume.shape)
    return [np.rot90(s) for s in (volume[:, :, z], volume[:, y, :], volume[x, :, :])]


def _to_uint8(slices: Sequence[Any]) -> list[Any]:
    import numpy as np

    values = np.concatenate([s.ravel() for s in slices])
    low, high = np.percentile(values, [1, 99]) if values.size else (0.0, 1.0)
    if high <= low:
        low, high = float(values.min()), float(values.max()) + 1e-6
    return [
        (np.clip((s - low) / (high - low), 0, 1) * 255).round().astype(np.uint8) for s in slices
    ]


def slice_panel(images: Sequence[Any], *, min_height: int = 128, gap: int = 2) -> Any:
    """One grey-level ``uint8`` picture ``(H, W)``: a row of mid-slices per image.

    Each image is scaled to its own 1st-99th percentile; small slices are
    enlarged (nearest neighbour) to at least ``min_height`` pixels.
    """
    import numpy as np

    rows = []
    for image in images:
        slices = _to_uint8(mid_slices(image))
        height = max(s.shape[0] for s in slices)
        zoom = max(1, -(-min_height // max(height, 1)))
        slices = [np.kron(s, np.ones((zoom, zoom), dtype=np.uint8)) for s in slices]
        height = max(s.shape[0] for s in slices)
        parts = []
        for s in slices:
            padded = np.zeros((height, s.shape[1]), dtype=np.uint8)
            padded[: s.shape[0]] = s
            parts.extend([padded, np.zeros((height, gap), dtype=np.uint8)])
        rows.append(np.concatenate(parts[:-1], axis=1))
    if not rows:
        return np.zeros((1, 1), dtype=np.uint8)
    width = max(r.shape[1] for r in rows)
    out = []
    for r in rows:
        padded = np.zeros((r.shape[0], width), dtype=np.uint8)
        padded[:, : r.shape[1]] = r
        out.extend([padded, np.zeros((gap, width), dtype=np.uint8)])
    return np.concatenate(out[:-1], axis=0)
