"""The transformers Trainer subclass: unified loss, per-modality logging, our checkpoints."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from transformers import Trainer

from umbrella_core.data.interleave import InterleavedSampler, Interleaving
from umbrella_core.model.build import save_checkpoint

__all__ = ["UmbrellaTrainer"]


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
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.interleaving = interleaving
        self.provenance = dict(provenance)
        self.run_meta = dict(run_meta)
        self._key_sum: dict[str, float] = {}
        self._key_tokens: dict[str, int] = {}
        self._term_sum: dict[str, float] = {}
        self._term_count = 0

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        return InterleavedSampler(self.interleaving, seed=self.args.seed)

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        outputs = model(**inputs)
        if model.training:
            for key, value in (outputs.key_losses or {}).items():
                tokens = outputs.key_tokens[key]
                self._key_sum[key] = self._key_sum.get(key, 0.0) + value * tokens
                self._key_tokens[key] = self._key_tokens.get(key, 0) + tokens
            for name, value in (outputs.terms or {}).items():
                self._term_sum[name] = self._term_sum.get(name, 0.0) + float(value.detach())
            self._term_count += 1
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._key_tokens:
            for key in sorted(self._key_tokens):
                logs[f"loss/{key}"] = round(self._key_sum[key] / max(self._key_tokens[key], 1), 4)
            for name in sorted(self._term_sum):
                logs[f"loss/{name}"] = round(self._term_sum[name] / max(self._term_count, 1), 4)
            self._key_sum, self._key_tokens, self._term_sum, self._term_count = {}, {}, {}, 0
        super().log(logs, start_time)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not self.args.should_save:
            return
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        save_checkpoint(
            model,
            self.processing_class,
            output_dir or self.args.output_dir,
            provenance=self.provenance,
            extra=self.run_meta,
        )
