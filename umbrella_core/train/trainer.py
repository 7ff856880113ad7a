"""The transformers Trainer subclass: unified loss, per-modality logging, our checkpoints."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from umbrella_core.constants import IGNORE_INDEX
from umbrella_core.data.interleave import InterleavedSampler, Interleaving
from umbrella_core.errors import DataError
from umbrella_core.evaluation.engine import Question
from umbrella_core.model.build import save_checkpoint
from umbrella_core.train.faults import check_loss, save_training_checkpoint

__all__ = ["UmbrellaTrainer"]


class AbsentEmbeddersStayPut(TrainerCallback):
    """Drop the exact-zero gradients of embedders whose modality no rank had this step.

    Coverage gives them gradients of exactly 0.0 (I4), but Adam would still
    move them with the momentum of earlier steps and count a step in their
    state. With their gradients set to None the optimizer skips them, as if
    the modality were not in the model for this step. After DDP's all-reduce
    a gradient is exactly zero only when it was on every rank, so every rank
    drops the same ones. DeepSpeed keeps gradients in its own buffers: there
    the step is left as it is.
    """

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not args.deepspeed:
            drop_absent_embedder_gradients(kwargs.get("model"))


class SamplerFollowsEpoch(TrainerCallback):
    """Give the interleaved sampler the number of the epoch the Trainer starts (I5).

    The Trainer tells its DataLoader the epoch and accelerate passes it on to
    the sampler, except where a run of several processes resumes mid-epoch:
    the skipped batches' sampler is then wrapped once more (a SkipBatchSampler
    around accelerate's BatchSamplerShard), out of ``set_epoch``'s reach, and
    the resumed epoch would draw the order of epoch 0. The epoch is counted
    as the Trainer counts it on resuming: optimizer steps done over steps per
    epoch.
    """

    def __init__(self, sampler: Callable[[], Any]) -> None:
        self.sampler = sampler

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        sampler, loader = self.sampler(), kwargs.get("train_dataloader")
        if sampler is None or loader is None:
            return
        per_epoch = max(-(-len(loader) // args.gradient_accumulation_steps), 1)
        sampler.set_epoch(state.global_step // per_epoch)


def drop_absent_embedder_gradients(model: Any) -> list[str]:
    """Set to None the gradients of embedders whose gradients are all exactly zero.

    Returns the modalities whose embedders were dropped (see
    :class:`AbsentEmbeddersStayPut`).
    """
    embeddings = getattr(getattr(model, "module", model), "embeddings", None)
    dropped = []
    for name, embedder in getattr(embeddings, "embedders", {}).items():
        grads = [p.grad for p in embedder.parameters() if p.grad is not None]
        if grads and not any(bool(g.any()) for g in grads):
            for p in embedder.parameters():
                p.grad = None
            dropped.append(name)
    return dropped


class UmbrellaTrainer(Trainer):
    """A Trainer for :class:`UmbrellaModel`.

    * The loss is the model's: unified next-token NLL plus loss-hook terms, with
      the coverage term that keeps every active embedder in the graph (I4).
    * ``loss/<modality>`` (mean NLL per sample modality key) and ``loss/<term>``
      are logged next to ``loss``, so TensorBoard shows each modality's curve.
    * Training order comes from the interleaver, deterministic from the seed.
    * Checkpoints are UMBRELLA checkpoints (safetensors + JSON, no pickle).
    """

    def __init__(
        self,
        *args: Any,
        interleaving: Interleaving,
        provenance: Mapping[str, tuple[str, str, str]],
        run_meta: Mapping[str, Any],
        questions: Mapping[str, Question] | None = None,
        eval_max_samples: int = 0,
        eval_max_new_tokens: int = 128,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        # The model's loss is a mean over its learned tokens; compute_loss turns
        # it into a share of the whole optimizer step's tokens (below), which
        # is what transformers expects of models that take loss kwargs.
        self.model_accepts_loss_kwargs = True
        self._loss_shifts_labels = True
        self.interleaving = interleaving
        # Each held-out question with its metric family, from every record of the
        # run (evaluate() scores with them); how many samples and tokens it may use.
        self.questions = dict(questions or {})
        self.eval_max_samples = eval_max_samples
        self.eval_max_new_tokens = eval_max_new_tokens
        self.provenance = dict(provenance)
        self.run_meta = dict(run_meta)
        self._key_sum: dict[str, float] = {}
        self._key_tokens: dict[str, int] = {}
        self._term_sum: dict[str, float] = {}
        self._term_count = 0
        self.add_callback(AbsentEmbeddersStayPut())
        self._interleaved_sampler: InterleavedSampler | None = None
        self.add_callback(SamplerFollowsEpoch(lambda: self._interleaved_sampler))
        if self.is_deepspeed_enabled:
            self.accelerator.unwrap_model(self.model).uniform_module_order = True

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        args = self.args
        self._interleaved_sampler = InterleavedSampler(
            self.interleaving,
            seed=args.seed,
            global_batch=args.per_device_train_batch_size
            * args.world_size
            * args.gradient_accumulation_steps,
            # An augmented dataset seeds each sample from its epoch and position.
            draws=getattr(self.train_dataset, "wants_draws", False),
        )
        return self._interleaved_sampler

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: Mapping[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        """The step's loss from the collator's :class:`Batch` (the model hands its loss
        terms the same ``Batch``), as a share of the optimizer step's learned tokens."""
        outputs = model(**inputs)
        loss = outputs.loss
        if num_items_in_batch is not None and outputs.nll is not None:
            # Token-weighted over the global batch (all ranks, all accumulated
            # micro-batches): this rank's NLL sum over the step's token count.
            # DDP then averages gradients over ranks, hence the world size:
            # N ranks give the gradient of one process holding every sample.
            local = (inputs["labels"][:, 1:] != IGNORE_INDEX).sum()
            share = local.to(outputs.nll.dtype) / num_items_in_batch
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                share = share * self.args.world_size
            rest = outputs.loss - outputs.nll  # coverage (exactly 0) and loss-hook terms
            loss = outputs.nll * share + rest / self.current_gradient_accumulation_steps
        if model.training:
            for key, value in (outputs.key_losses or {}).items():
                tokens = outputs.key_tokens[key]
                self._key_sum[key] = self._key_sum.get(key, 0.0) + value * tokens
                self._key_tokens[key] = self._key_tokens.get(key, 0) + tokens
            for name, value in (outputs.terms or {}).items():
                self._term_sum[name] = self._term_sum.get(name, 0.0) + float(value.detach())
            self._term_count += 1
            # Before the backward pass: a NaN/inf step is reported, never applied.
            # The collator's batch names each sample's source (file:line).
            check_loss(self, loss, outputs, inputs.get("sample_keys"), inputs.get("sample_sources"))
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self.args.world_size > 1:
            self._gather_modality_losses()
        if "loss" in logs and self._key_tokens:
            for key in sorted(self._key_tokens):
                logs[f"loss/{key}"] = round(self._key_sum[key] / max(self._key_tokens[key], 1), 4)
            for name in sorted(self._term_sum):
                logs[f"loss/{name}"] = round(self._term_sum[name] / max(self._term_count, 1), 4)
            self._key_sum, self._key_tokens, self._term_sum, self._term_count = {}, {}, {}, 0
        super().log(logs, start_time)

    def evaluate(
        self,
        eval_dataset: Any = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> dict[str, float]:
        """Held-out loss and answer accuracy per modality (``eval_loss/t1``, ``eval_accuracy``)."""
        from umbrella_core.train.evaluate import evaluate_trainer

        return evaluate_trainer(self, eval_dataset, metric_key_prefix=metric_key_prefix)

    def _gather_modality_losses(self) -> None:
        """Sum every rank's per-modality sums: ranks hold different modalities."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        parts: list[Any] = [None] * dist.get_world_size()
        mine = (self._key_sum, self._key_tokens, self._term_sum, self._term_count)
        dist.all_gather_object(parts, mine)
        key_sum: dict[str, float] = {}
        key_tokens: dict[str, int] = {}
        term_sum: dict[str, float] = {}
        for sums, tokens, terms, _ in parts:
            for key, value in sums.items():
                key_sum[key] = key_sum.get(key, 0.0) + value
                key_tokens[key] = key_tokens.get(key, 0) + tokens[key]
            for name, value in terms.items():
                term_sum[name] = term_sum.get(name, 0.0) + value
        self._key_sum, self._key_tokens, self._term_sum = key_sum, key_tokens, term_sum
        self._term_count = sum(part[3] for part in parts)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        from safetensors import SafetensorError

        try:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        except SafetensorError as exc:
            # A truncated copy, or a disk that filled while it was written elsewhere.
            raise DataError(
                f"{resume_from_checkpoint}: its weights cannot be read ({exc}): the "
                "checkpoint is truncated or damaged; resume from an earlier one (--resume "
                "CHECKPOINT) or start afresh without --resume"
            ) from None

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        # The restored scheduler brings back the learning rates it was made
        # with; a learning rate allowed to change on resuming
        # (trainer.resume_allow) takes effect from the resumed step on.
        scheduler = self.lr_scheduler
        # Called once the Trainer has made both, to restore their states.
        assert self.optimizer is not None and scheduler is not None
        wanted = [g.get("initial_lr", g["lr"]) for g in self.optimizer.param_groups]
        super()._load_optimizer_and_scheduler(checkpoint)
        lambdas = getattr(scheduler, "lr_lambdas", None)
        if checkpoint is None or lambdas is None or list(scheduler.base_lrs) == wanted:
            return
        scheduler.base_lrs = list(wanted)
        for group, lr, factor in zip(self.optimizer.param_groups, wanted, lambdas, strict=True):
            group["initial_lr"] = lr
            group["lr"] = lr * factor(scheduler.last_epoch)
        scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        # checkpoint-N/ appears whole or not at all (train/faults.py).
        save_training_checkpoint(self, trial)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not self.args.should_save:
            return
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        target = output_dir or self.args.output_dir
        assert target is not None  # TrainingArguments defaults output_dir to trainer_output
        save_checkpoint(
            model,
            self.processing_class,
            target,
            provenance=self.provenance,
            extra=self.run_meta,
            state_dict=state_dict,
        )
