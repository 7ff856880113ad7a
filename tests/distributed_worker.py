"""One process of the distributed tests (run by torchrun from tests/test_distributed.py).

``python distributed_worker.py OUT [--deepspeed zero2|zero3] [--check-sampler]``
under ``torchrun --nproc_per_node 2`` (or alone, as the single-process
reference) trains the tiny model on the t1+dmri demo for a few steps with the
project's own Trainer and training arguments. The order of samples is fixed
so that in every step rank 0 holds only t1 samples and rank 1 only dmri ones;
the single-process run gets the same global batches (twice the per-device
batch). Rank 0 writes the final weights to ``OUT/weights.safetensors`` and the
per-step losses to ``OUT/losses.json``. With ``--check-sampler`` each rank
also writes the sample indices its real DataLoader (2 workers) yields in one
epoch of the default interleaved sampler to ``OUT/drawn-RANK.json``. With
``--augment`` the training images are augmented (the ``light`` preset of each
modality plus a noise step that always fires), each drawn by its position in
the fixed order, as the interleaved sampler's draws are.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import sys
from pathlib import Path

import torch
from torch.utils.data import ConcatDataset

from umbrella_core.config import load_config
from umbrella_core.data.augmented import AugmentedDataset
from umbrella_core.data.collate import UmbrellaCollator
from umbrella_core.data.interleave import Interleaving
from umbrella_core.data.studies import read_studies
from umbrella_core.plugins import get_plugin_manager
from umbrella_core.train.arguments import training_arguments
from umbrella_core.train.run import prepare
from umbrella_core.train.trainer import UmbrellaTrainer

STEPS = 3
PER_DEVICE = 2


class FixedOrder(torch.utils.data.Sampler):
    def __init__(self, order: list[int], draws: bool = False) -> None:
        self.order = order
        self.draws = draws

    def __iter__(self):
        if self.draws:  # as InterleavedSampler(draws=True) yields them: (index, epoch, position)
            return iter([(index, 0, position) for position, index in enumerate(self.order)])
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)


class FixedOrderTrainer(UmbrellaTrainer):
    order: list[int] = []

    def _get_train_sampler(self, train_dataset=None):
        return FixedOrder(self.order, draws=getattr(self.train_dataset, "wants_draws", False))


class IndexedDataset(ConcatDataset):
    """Items carry their own index as their key, so a batch says which samples it holds."""

    def __getitem__(self, index):
        item = dict(super().__getitem__(index))
        item["key"] = str(index)
        return item


def main() -> None:
    # A hang (the failure mode of ranks that disagree) ends with every thread's
    # stack in the log instead of a silent wait for the test's timeout.
    faulthandler.dump_traceback_later(
        int(os.environ.get("UMBRELLA_HANG_SECONDS", "240")), exit=True
    )
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--deepspeed", default="")
    parser.add_argument("--check-sampler", action="store_true")
    parser.add_argument("--augment", action="store_true")
    cli = parser.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    config = load_config(
        None,
        [
            "data.modalities=t1,dmri",
            "data.demo_subjects=11",  # 8 train, 1 validation, 2 test per modality
            "data.check=none",
            "model.trainable=full",
            f"trainer.output_dir={cli.out / 'run'}",
            f"trainer.max_steps={STEPS}",
            f"trainer.batch_size={PER_DEVICE * 2 // world}",
            "trainer.learning_rate=0.01",
            "trainer.warmup_ratio=0",
            "trainer.logging_steps=1",
            "trainer.eval_strategy=no",
            "trainer.progress=false",
            f"trainer.deepspeed={cli.deepspeed}",
            *(
                [
                    f"data.augment.{m}=[light, {{name: RandGaussianNoise, prob: 1.0, std: 0.1}}]"
                    for m in ("t1", "dmri")
                ]
                if cli.augment
                else []
            ),
        ],
    )
    args = training_arguments(config, cli.out / "run")
    assert args.world_size == world and args.ddp_find_unused_parameters is False
    pm = get_plugin_manager()
    with args.main_process_first(local=False):
        data = read_studies(config, pm, log=lambda *_: None)
    prep = prepare(config, pm, log=lambda *_: None, data=data)
    t1_set, dmri_set = (
        next(ds for ds in prep.train_sets if ds.name.endswith("/" + key)) for key in ("t1", "dmri")
    )
    sets = [t1_set, dmri_set]
    # Per step: PER_DEVICE t1 samples, then PER_DEVICE dmri samples. Two ranks
    # take one per-device batch each (rank 0: t1, rank 1: dmri); one process
    # takes both as one batch.
    order = []
    for step in range(STEPS):
        order += [i for i in range(step * PER_DEVICE, (step + 1) * PER_DEVICE)]
        order += [len(t1_set) + i for i in range(step * PER_DEVICE, (step + 1) * PER_DEVICE)]
    FixedOrderTrainer.order = order
    collator = UmbrellaCollator(prep.tokenizer.pad_token_id, tuple(prep.specs))
    seen_modalities = []

    class Recording(FixedOrderTrainer):
        def compute_loss(self, model, inputs, *rest, **kwargs):
            seen_modalities.append(sorted(inputs["pixel_values"]))
            return super().compute_loss(model, inputs, *rest, **kwargs)

    if cli.augment:
        assert set(prep.augment) == {"t1", "dmri"}
        train_dataset = AugmentedDataset(sets, prep.augment, seed=config.trainer.seed)
    else:
        train_dataset = ConcatDataset(sets)
    trainer = Recording(
        model=prep.model,
        args=args,
        train_dataset=train_dataset,
        data_collator=collator,
        processing_class=prep.tokenizer,
        interleaving=Interleaving([len(s) for s in sets]),
        provenance=prep.provenance,
        run_meta={},
    )
    trainer.train()
    expected = [[("t1", "dmri")[args.process_index]]] if world > 1 else [["dmri", "t1"]]
    assert seen_modalities == expected * STEPS, seen_modalities
    # A collective under ZeRO-3 (it gathers the partitions): every rank calls it.
    state = trainer.accelerator.get_state_dict(trainer.model_wrapped)
    if args.process_index == 0:
        from safetensors.torch import save_file

        unique = {}
        seen = set()
        for name, tensor in state.items():
            if tensor.data_ptr() in seen:
                continue
            seen.add(tensor.data_ptr())
            unique[name] = tensor.contiguous()
        save_file(unique, str(cli.out / "weights.safetensors"))
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        (cli.out / "losses.json").write_text(json.dumps(losses))
        logged = sorted({k for e in trainer.state.log_history for k in e if k.startswith("loss/")})
        (cli.out / "logged.json").write_text(json.dumps(logged))

    if cli.check_sampler:
        sampler_config = load_config(
            None,
            [
                "data.modalities=t1,dmri",
                "data.demo_subjects=11",  # 8 train, 1 validation, 2 test per modality
                "data.workers=2",
                f"trainer.output_dir={cli.out / 'sampler'}",
                "trainer.batch_size=2",
                "trainer.eval_strategy=no",
                "trainer.progress=false",
            ],
        )
        sampler_args = training_arguments(sampler_config, cli.out / "sampler")
        dataset = IndexedDataset(prep.train_sets)
        checker = UmbrellaTrainer(
            model=prep.model,
            args=sampler_args,
            train_dataset=dataset,
            data_collator=collator,
            processing_class=prep.tokenizer,
            interleaving=Interleaving([len(s) for s in prep.train_sets]),
            provenance=prep.provenance,
            run_meta={},
        )
        loader = checker.get_train_dataloader()
        drawn = [int(k) for batch in loader for k in batch["sample_keys"]]
        (cli.out / f"drawn-{args.process_index}.json").write_text(
            json.dumps({"drawn": drawn, "total": len(dataset)})
        )


if __name__ == "__main__":
    main()
    if torch.distributed.is_initialized():
        # As umbrella train does: see umbrella_core.commands.train.
        torch.distributed.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
