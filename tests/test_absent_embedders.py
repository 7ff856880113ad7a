"""AdamW does not move the embedder of a modality that was absent from a step."""

from __future__ import annotations

import torch
from torch.utils.data import ConcatDataset
from transformers import TrainerCallback

from umbrella_core.config import load_config
from umbrella_core.data.collate import UmbrellaCollator
from umbrella_core.data.interleave import Interleaving
from umbrella_core.plugins import get_plugin_manager
from umbrella_core.train.arguments import training_arguments
from umbrella_core.train.run import prepare
from umbrella_core.train.trainer import UmbrellaTrainer


class Snapshots(TrainerCallback):
    """The dmri embedder's weights and AdamW step count after every step."""

    def __init__(self) -> None:
        self.weights: list[list[torch.Tensor]] = []
        self.adam_steps: list[float] = []

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        params = list(model.embeddings.embedders["dmri"].parameters())
        self.weights.append([p.detach().clone() for p in params])
        first = optimizer.state.get(params[0], {})
        self.adam_steps.append(float(first.get("step", 0)))


def test_adamw_leaves_an_absent_modality_untouched_and_trains_it_when_present(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("UMBRELLA_CACHE", str(tmp_path / "cache"))
    config = load_config(
        None,
        [
            "data.modalities=t1,dmri",
            # 8 training samples per modality (2 test, 1 validation): whole
            # batches of 2, so no leftover mixed batch ends the epoch.
            "data.demo_subjects=11",
            "data.batching=modality",
            "model.trainable=full",
            f"trainer.output_dir={tmp_path / 'run'}",
            "trainer.max_steps=8",
            "trainer.batch_size=2",
            "trainer.eval_strategy=no",
            "trainer.progress=false",
        ],
    )
    args = training_arguments(config, tmp_path / "run")
    prep = prepare(config, get_plugin_manager(), log=lambda *_: None)
    seen: list[list[str]] = []

    class Recording(UmbrellaTrainer):
        def compute_loss(self, model, inputs, *rest, **kwargs):
            seen.append(sorted(inputs["pixel_values"]))
            return super().compute_loss(model, inputs, *rest, **kwargs)

    snapshots = Snapshots()
    trainer = Recording(
        model=prep.model,
        args=args,
        train_dataset=ConcatDataset(prep.train_sets),
        data_collator=UmbrellaCollator(prep.tokenizer.pad_token_id, tuple(prep.specs)),
        processing_class=prep.tokenizer,
        interleaving=Interleaving.of_datasets(prep.train_sets, prep.weights, "modality"),
        provenance=prep.provenance,
        run_meta={},
        callbacks=[snapshots],
    )
    trainer.train()
    assert {tuple(s) for s in seen} == {("t1",), ("dmri",)}
    for step in range(1, len(seen)):
        before, after = snapshots.weights[step - 1], snapshots.weights[step]
        unchanged = all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
        if seen[step] == ["t1"]:
            # Not moved by AdamW's momentum, and no step counted in its state.
            assert unchanged, step
            assert snapshots.adam_steps[step] == snapshots.adam_steps[step - 1]
        else:
            assert not unchanged, step
            assert snapshots.adam_steps[step] == snapshots.adam_steps[step - 1] + 1
