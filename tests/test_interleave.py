"""The interleaver (I5): ranks, workers, modality-homogeneous batches, temperature."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from umbrella_core.data.interleave import InterleavedSampler, Interleaving, size_weights
from umbrella_core.testing.helpers import rank_order


class Indices(Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> int:
        return index


def test_ranks_draw_disjoint_samples_that_cover_the_trimmed_epoch():
    mix = Interleaving([37, 21, 9])
    sampler = InterleavedSampler(mix, seed=3, global_batch=4 * 3)  # batch 4, 3 ranks
    order = sampler.order()
    assert len(order) == 60 and len(set(order.tolist())) == 60  # 67 trimmed to 5 global batches
    drawn = [rank_order(sampler, rank, 3, 4) for rank in range(3)]
    assert sum(len(d) for d in drawn) == 60
    assert set().union(*(set(d.tolist()) for d in drawn)) == set(order.tolist())
    assert all(not set(a.tolist()) & set(b.tolist()) for a in drawn for b in drawn if a is not b)
    # Another epoch is another order, and the trimmed samples differ between epochs.
    sampler.set_epoch(1)
    assert not np.array_equal(sampler.order(), order)


def test_dataloader_workers_yield_every_sampled_index_once():
    sampler = InterleavedSampler(Interleaving([30, 14]), seed=0, global_batch=4)
    loader = DataLoader(Indices(44), batch_size=4, sampler=sampler, num_workers=2)
    seen = torch.cat(list(loader)).tolist()
    assert seen == sampler.order().tolist()


def test_modality_batching_gives_one_key_per_global_batch_and_the_same_draws():
    sizes, keys = [40, 24, 12], ["t1", "dmri", "t1"]  # two t1 studies share a key
    mix = Interleaving(sizes, keys=keys)
    key_of = np.asarray(keys)[mix.source_of(np.arange(sum(sizes)))]
    sampler = InterleavedSampler(mix, seed=1, global_batch=8, batching="modality")
    order = sampler.order()
    mixed = mix.epoch_order(seed=1, epoch=0)
    # Same samples as the mixed order (nothing repeated or lost but the trimmed tail).
    assert set(order.tolist()) <= set(mixed.tolist()) and len(set(order.tolist())) == len(order)
    blocks = order.reshape(-1, 8)
    homogeneous = [len(set(key_of[b])) == 1 for b in blocks]
    # 52 t1 and 24 dmri draws: 6 + 3 whole blocks, then the t1 leftover (4) is trimmed.
    assert len(blocks) == 9 and all(homogeneous)
    assert {key_of[b][0] for b in blocks} == {"t1", "dmri"}
    # Deterministic from (seed, epoch).
    assert np.array_equal(
        order, InterleavedSampler(mix, seed=1, global_batch=8, batching="modality").order()
    )


def test_leftovers_of_each_key_are_pooled_at_the_end():
    mix = Interleaving([10, 6], keys=["t1", "dmri"])
    order = mix.grouped_order(seed=0, epoch=0, block=4)
    key_of = np.where(order < 10, "t1", "dmri")
    assert sorted(order.tolist()) == list(range(16))
    blocks = key_of.reshape(-1, 4)
    assert all(len(set(b)) == 1 for b in blocks[:3]) and len(set(blocks[3])) == 2


def test_temperature_flattens_size_proportional_weights():
    assert size_weights([100, 25], 1.0) == [100.0, 25.0]
    flat = size_weights([100, 25], 2.0)
    assert flat[0] / flat[1] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="temperature"):
        size_weights([1], 0.0)
    counts = np.bincount(
        Interleaving([100, 25], flat).source_of(Interleaving([100, 25], flat).epoch_order(0, 0))
    )
    assert counts.tolist() == [83, 42]


def test_unknown_batching_is_refused():
    with pytest.raises(ValueError, match="batching"):
        InterleavedSampler(Interleaving([3]), batching="random")


@pytest.mark.slow
def test_training_with_modality_batching_has_one_modality_per_step(tmp_path, monkeypatch):
    import json

    from umbrella_core.commands import main

    monkeypatch.setenv("UMBRELLA_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    args = ["train", "--modalities", "t1,dmri", "--demo-subjects", "10", "--max-steps", "6"]
    args += ["--batch-size", "2", "--output-dir", str(out), "--no-progress"]
    for setting in ("data.batching=modality", "trainer.logging_steps=1", "trainer.save_steps=6"):
        args += ["--set", setting]
    assert main(args) == 0
    state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    steps = [e for e in state["log_history"] if "loss" in e]
    assert len(steps) == 6
    # Each step logs the loss of the one modality its batch held.
    assert all(("loss/t1" in e) != ("loss/dmri" in e) for e in steps)
    assert any("loss/t1" in e for e in steps) and any("loss/dmri" in e for e in steps)
