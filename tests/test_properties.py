"""Property-based tests (hypothesis) of the collator and the interleaver.

The strategies come from :mod:`umbrella_core.testing.strategies`, the same
ones plugin authors get.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from umbrella_core.data.collate import UmbrellaCollator
from umbrella_core.data.interleave import InterleavedSampler, Interleaving
from umbrella_core.testing.helpers import rank_order
from umbrella_core.testing.strategies import (
    conversations,
    modality_specs,
    study_records,
    token_items,
)
from umbrella_core.types import IMAGE_PLACEHOLDER

torch = pytest.importorskip("torch")

SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PAD = 0
#: Canonical order, and an image shape per modality: shapes differ, grouping is by name.
ORDER = ("dmri", "fmri", "t1")
SHAPES = {"dmri": (2, 3), "fmri": (1, 3, 2), "t1": (1, 3)}


# ---------------------------------------------------------------------------
# The strategies themselves
# ---------------------------------------------------------------------------


@SETTINGS
@given(study_records(modality_specs()))
def test_strategy_records_are_valid(record):
    placeholders = sum(t.content.count(IMAGE_PLACEHOLDER) for t in record.turns)
    assert placeholders == len(record.images) >= 1
    assert record.turns[-1].role == "assistant"


@SETTINGS
@given(st.data())
def test_strategy_specs_and_conversations(data):
    spec = data.draw(modality_specs())
    assert spec.num_tokens == int(
        np.prod([s // p for s, p in zip(spec.shape, spec.patch_size, strict=True)])
    )
    n = data.draw(st.integers(0, 4))
    turns = data.draw(conversations(images=n))
    assert sum(t.content.count(IMAGE_PLACEHOLDER) for t in turns) == n
    assert all(IMAGE_PLACEHOLDER not in t.content for t in turns if t.role == "assistant")


# ---------------------------------------------------------------------------
# Collator
# ---------------------------------------------------------------------------


def _with_tensors(items):
    """Replace each image's modality by (modality, tensor tagged with its global index)."""
    tag = 0
    out = []
    for item in items:
        images = []
        for modality in item["images"]:
            images.append((modality, torch.full(SHAPES[modality], float(tag))))
            tag += 1
        out.append({**item, "images": images})
    return out


@SETTINGS
@given(
    st.lists(token_items(ORDER), min_size=1, max_size=5),
    st.lists(st.sampled_from(ORDER), min_size=0, max_size=3, unique=True),
)
def test_collator_groups_pads_and_masks(raw_items, extra_active):
    items = _with_tensors(raw_items)
    used = {m for item in raw_items for m in item["images"]}
    # The active modalities: those used plus any others, in canonical order.
    order = tuple(m for m in ORDER if m in used or m in extra_active)
    batch = UmbrellaCollator(PAD, order)(items)

    # Images: grouped per modality in canonical order, each group in batch order.
    flat = [(m, t) for item in items for m, t in item["images"]]
    assert batch["image_modalities"] == [m for m, _ in flat]
    assert list(batch["pixel_values"]) == [m for m in order if m in used]
    for modality, stacked in batch["pixel_values"].items():
        expected = [t for m, t in flat if m == modality]
        assert stacked.shape == (len(expected), *SHAPES[modality])
        assert [float(x.flatten()[0]) for x in stacked] == [
            float(t[0].flatten()[0]) for t in expected
        ]

    # Text: right padding with the pad id, mask 1 on tokens, labels -100 on prompt and padding.
    length = max(len(i["input_ids"]) for i in raw_items)
    assert batch["input_ids"].shape == batch["labels"].shape == (len(items), length)
    for row, item in enumerate(raw_items):
        n, prompt = len(item["input_ids"]), item["prompt"]
        assert batch["input_ids"][row, :n].tolist() == item["input_ids"]
        assert (batch["input_ids"][row, n:] == PAD).all()
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (length - n)
        labels = batch["labels"][row].tolist()
        assert labels[:prompt] == [-100] * prompt
        assert labels[prompt:n] == item["input_ids"][prompt:]
        assert labels[n:] == [-100] * (length - n)
    assert batch["sample_keys"] == [i["key"] for i in raw_items]


@SETTINGS
@given(st.lists(token_items(ORDER, max_images=2), min_size=1, max_size=4))
def test_collator_refuses_inactive_modalities(raw_items):
    used = [m for item in raw_items for m in item["images"]]
    if not used:
        return
    inactive = used[0]
    collator = UmbrellaCollator(PAD, tuple(m for m in ORDER if m != inactive))
    with pytest.raises(ValueError, match=f"'{inactive}'"):
        collator(_with_tensors(raw_items))


# ---------------------------------------------------------------------------
# Interleaver
# ---------------------------------------------------------------------------

sizes_st = st.lists(st.integers(1, 30), min_size=1, max_size=5)
seeds = st.integers(0, 2**16)
epochs = st.integers(0, 20)


@st.composite
def weighted(draw):
    sizes = draw(sizes_st)
    weights = draw(st.lists(st.floats(0.0, 10.0), min_size=len(sizes), max_size=len(sizes)))
    if sum(weights) <= 0:
        weights[0] = 1.0
    return sizes, weights


@SETTINGS
@given(weighted(), seeds, epochs, st.integers(1, 200))
def test_each_source_gets_its_weighted_share(sources, seed, epoch, length):
    sizes, weights = sources
    mix = Interleaving(sizes, weights)
    order = mix.epoch_order(seed, epoch, length)
    assert len(order) == length
    counts = np.bincount(mix.source_of(order), minlength=len(sizes))
    expected = np.asarray(weights) / sum(weights) * length
    assert np.all(np.abs(counts - expected) < 1.0), (counts, expected)
    # Within a source, no sample repeats before every sample of it has been drawn.
    for source, size in enumerate(sizes):
        drawn = order[mix.source_of(order) == source] - mix.offsets[source]
        for start in range(0, len(drawn), size):
            chunk = drawn[start : start + size]
            assert len(set(chunk.tolist())) == len(chunk)


@SETTINGS
@given(sizes_st, seeds, epochs)
def test_size_weights_give_a_permutation_of_the_epoch(sizes, seed, epoch):
    mix = Interleaving(sizes)
    order = mix.epoch_order(seed, epoch)
    assert sorted(order.tolist()) == list(range(mix.total))
    np.testing.assert_array_equal(order, Interleaving(sizes).epoch_order(seed, epoch))


@SETTINGS
@given(sizes_st, seeds, epochs, st.integers(1, 16))
def test_sampler_trims_to_whole_global_batches(sizes, seed, epoch, global_batch):
    mix = Interleaving(sizes)
    sampler = InterleavedSampler(mix, seed, global_batch=global_batch)
    sampler.set_epoch(epoch)
    order = list(sampler)
    total = mix.total
    expected = total // global_batch * global_batch or total
    assert len(order) == len(sampler) == expected
    assert order == mix.epoch_order(seed, epoch)[:expected].tolist()


@SETTINGS
@given(sizes_st, seeds, epochs, st.integers(1, 4), st.integers(1, 4))
def test_ranks_draw_disjoint_equal_shares(sizes, seed, epoch, world_size, batch_size):
    mix = Interleaving(sizes)
    sampler = InterleavedSampler(mix, seed, global_batch=world_size * batch_size)
    if len(sampler) < world_size * batch_size:
        return  # fewer samples than one global batch: kept whole for one rank's sake
    per_rank = [rank_order(sampler, r, world_size, batch_size, epoch) for r in range(world_size)]
    assert {len(p) for p in per_rank} == {len(sampler) // world_size}
    drawn = np.concatenate(per_rank).tolist()
    assert len(set(drawn)) == len(drawn)  # no sample on two ranks
    assert sorted(drawn) == sorted(sampler.order(epoch).tolist())


@SETTINGS
@given(weighted(), seeds, epochs, st.integers(1, 8))
def test_grouped_order_has_the_same_draws_in_homogeneous_blocks(sources, seed, epoch, block):
    sizes, weights = sources
    keys = [("t1", "dmri", "fmri")[i % 3] for i in range(len(sizes))]
    mix = Interleaving(sizes, weights, keys=keys)
    mixed = mix.epoch_order(seed, epoch)
    grouped = mix.grouped_order(seed, epoch, block)
    assert sorted(grouped.tolist()) == sorted(mixed.tolist())
    key_of = np.asarray(keys)[mix.source_of(grouped)]
    # Whole blocks come first; at most one leftover (partial) run per key at the end.
    counts = {k: int((np.asarray(keys)[mix.source_of(mixed)] == k).sum()) for k in set(keys)}
    whole = sum(c // block * block for c in counts.values())
    for start in range(0, whole, block):
        assert len(set(key_of[start : start + block].tolist())) == 1


@SETTINGS
@given(
    sizes_st,
    seeds,
    epochs,
    st.integers(1, 6),
    st.integers(0, 40),
    st.sampled_from(("mixed", "modality", "length")),
)
def test_resuming_after_k_batches_gives_exactly_the_rest(sizes, seed, epoch, batch, k, batching):
    keys = [("t1", "dmri")[i % 2] for i in range(len(sizes))]
    lengths = np.arange(sum(sizes)) * 7 % 11  # for length batching: many ties
    first = InterleavedSampler(
        Interleaving(sizes, keys=keys, lengths=lengths), seed, global_batch=batch, batching=batching
    )
    first.set_epoch(epoch)
    stream = iter(first)
    consumed = [next(stream) for _ in range(min(k * batch, len(first)))]
    rest = list(stream)
    # A new process: other epochs computed first, then the same (seed, epoch) again.
    resumed = InterleavedSampler(
        Interleaving(sizes, keys=keys, lengths=lengths), seed, global_batch=batch, batching=batching
    )
    for other in (epoch + 1, epoch + 3):
        resumed.order(other)
    resumed.set_epoch(epoch)
    again = list(resumed)
    assert again[: len(consumed)] == consumed
    assert again[len(consumed) :] == rest
