"""`data.batching: length`: batches of similar length, with everything I5 promises kept."""

from __future__ import annotations

import random

import numpy as np
import pytest
from torch.utils.data import BatchSampler, DataLoader, Dataset

from umbrella_core.config import load_config
from umbrella_core.data.conversation import Tokenization
from umbrella_core.data.dataset import RecordDataset
from umbrella_core.data.interleave import InterleavedSampler, Interleaving
from umbrella_core.errors import ConfigError
from umbrella_core.model.tokenizer import build_byte_tokenizer
from umbrella_core.testing import toy_modality
from umbrella_core.types import IMAGE_PLACEHOLDER, ImageRef, StudyRecord, Turn

#: Image tokens differ between modalities: 64 for t1, 8 for dmri.
SPECS = {
    "t1": toy_modality("t1", shape=(16, 16, 16), patch_size=(4, 4, 4)),
    "dmri": toy_modality("dmri"),
}
TOKENIZER = build_byte_tokenizer()
WORDS = "the left right lesion in white matter of a small large frontal temporal lobe".split()


def _record(i: int, modality: str, rng: random.Random) -> StudyRecord:
    """A question about one scan or (one in four) a comparison of two; answers of any length."""
    scans = 2 if i % 4 == 0 else 1
    question = "Are these two subjects of the same sex?" if scans == 2 else "What does it show?"
    answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40)))
    return StudyRecord(
        subject=f"sub-{i:03d}",
        # Files that do not exist: a length is known without opening an image.
        images=[
            ImageRef(modality=modality, paths=[f"/nowhere/{i}-{k}.nii.gz"]) for k in range(scans)
        ],
        turns=[
            Turn(role="user", content=" ".join([IMAGE_PLACEHOLDER] * scans) + "\n" + question),
            Turn(role="assistant", content=answer),
        ],
        source=f"study.jsonl:{i + 1}",
    )


def _dataset(modality: str, n: int, seed: int, **kwargs) -> RecordDataset:
    rng = random.Random(seed)
    return RecordDataset(
        [_record(i, modality, rng) for i in range(n)],
        SPECS,
        Tokenization.of(TOKENIZER, 4, SPECS, 4096),
        **kwargs,
    )


@pytest.fixture(scope="module")
def study():
    """Two t1 sources and one dmri source (two keys), with the samples' real lengths."""
    sets = [_dataset("t1", 90, 0), _dataset("dmri", 50, 1), _dataset("t1", 37, 2)]
    return Interleaving(
        [len(ds) for ds in sets],
        keys=["t1", "dmri", "t1"],
        lengths=np.concatenate([ds.lengths for ds in sets]),
        batching="length",
    )


class Indices(Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> int:
        return index


def _padding(order: np.ndarray, lengths: np.ndarray, batch: int) -> float:
    """Pad tokens over all tokens of ``order`` cut in batches of ``batch`` (as collated)."""
    pads = total = 0
    for start in range(0, len(order), batch):
        rows = lengths[order[start : start + batch]]
        pads += int((rows.max() - rows).sum())
        total += int(rows.max()) * len(rows)
    return pads / total


def test_lengths_are_the_encoded_lengths_and_can_be_handed_over():
    dataset = _dataset("t1", 40, 3)
    encoded = [len(dataset.encode(dataset.record(r)).input_ids) for r, _ in dataset.items]
    assert dataset.lengths.tolist() == encoded
    assert len(set(encoded)) > 20  # the study's lengths do vary
    # Lengths a caller already knows (screening encodes every record) are taken as they are.
    given = _dataset("t1", 40, 3, record_lengths=encoded)
    given.tokenizer = None  # nothing is tokenized again
    assert given.lengths.tolist() == encoded
    with pytest.raises(ValueError, match="39 lengths for 40 records"):
        _dataset("t1", 40, 3, record_lengths=encoded[:-1])


def test_the_same_seed_and_epoch_give_the_same_batches_and_another_epoch_others(study):
    def batches(epoch: int) -> np.ndarray:
        sampler = InterleavedSampler(study, seed=7, global_batch=8, batching="length")
        sampler.set_epoch(epoch)
        return sampler.order()

    assert np.array_equal(batches(0), batches(0))
    assert not np.array_equal(batches(0), batches(1))
    # Not only the order of the batches: which samples share a batch changes too.
    together = [{frozenset(b) for b in batches(e).reshape(-1, 8).tolist()} for e in (0, 1)]
    assert len(together[0] & together[1]) < len(together[0]) // 2


def test_two_ranks_with_two_workers_each_draw_every_sample_of_the_epoch_once(study):
    from accelerate.data_loader import BatchSamplerShard

    batch, ranks = 3, 2
    sampler = InterleavedSampler(study, seed=1, global_batch=batch * ranks, batching="length")
    sampler.set_epoch(2)
    drawn = []
    for rank in range(ranks):
        # How accelerate (and so the Trainer) gives each rank its batches.
        shard = BatchSamplerShard(
            BatchSampler(sampler, batch, drop_last=False), num_processes=ranks, process_index=rank
        )
        loader = DataLoader(Indices(study.total), batch_sampler=shard, num_workers=2)
        drawn.append([i for b in loader for i in b.tolist()])
    assert len(drawn[0]) == len(drawn[1])
    everything = drawn[0] + drawn[1]
    assert len(everything) == len(set(everything))  # no sample twice, over ranks and workers
    # Every sample of the epoch but the tail trimmed to whole global batches (177 = 29 * 6 + 3).
    assert sorted(everything) == sorted(sampler.order().tolist())
    assert len(everything) == study.total // (batch * ranks) * (batch * ranks) == 174


def test_resuming_mid_epoch_through_the_trainer_gives_exactly_the_remaining_batches(
    study, tmp_path
):
    import torch
    from accelerate import skip_first_batches
    from transformers import TrainingArguments

    from umbrella_core.train.trainer import UmbrellaTrainer

    def loader():
        args = TrainingArguments(
            output_dir=str(tmp_path),
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
            seed=5,
            report_to=[],
            use_cpu=True,
        )
        trainer = UmbrellaTrainer(
            model=torch.nn.Linear(1, 1),
            args=args,
            train_dataset=Indices(study.total),
            data_collator=lambda items: torch.tensor(items),
            interleaving=study,
            provenance={},
            run_meta={},
        )
        return trainer.get_train_dataloader()

    def epoch(dataloader, number):
        dataloader.set_epoch(number)  # what the Trainer does each epoch, after skipping
        return [b.tolist() for b in dataloader]

    whole = epoch(loader(), 1)
    # Epoch 1's length batching, 177 samples trimmed to 44 steps of 2 micro-batches of 2.
    expected = InterleavedSampler(study, seed=5, global_batch=4, batching="length").order(1)
    assert whole == expected.reshape(88, 2).tolist()
    # A new process resumes after 5 optimizer steps (10 micro-batches) of epoch 1.
    assert epoch(skip_first_batches(loader(), 10), 1) == whole[10:]


def test_two_ranks_resumed_mid_epoch_draw_exactly_their_remaining_batches(study):
    from types import SimpleNamespace

    from accelerate import skip_first_batches
    from accelerate.data_loader import prepare_data_loader

    from umbrella_core.train.trainer import SamplerFollowsEpoch

    args = SimpleNamespace(gradient_accumulation_steps=1)

    def epoch(rank, number, skip=0):
        # Rank ``rank`` of 2, batches of 3, as the Trainer's accelerator prepares them.
        sampler = InterleavedSampler(study, seed=2, global_batch=6, batching="length")
        loader = prepare_data_loader(
            DataLoader(Indices(study.total), batch_size=3, sampler=sampler),
            num_processes=2,
            process_index=rank,
            put_on_device=False,
        )
        done = SimpleNamespace(global_step=number * len(loader) + skip)
        SamplerFollowsEpoch(lambda: sampler).on_epoch_begin(
            args, done, None, train_dataloader=loader
        )
        if skip:
            loader = skip_first_batches(loader, skip)
        loader.set_epoch(number)  # does not reach the sampler of a skipped, sharded loader
        return [b.tolist() for b in loader]

    for rank in range(2):
        whole = epoch(rank, 1)
        assert whole != epoch(rank, 0)
        assert epoch(rank, 1, skip=7) == whole[7:]


def test_each_step_holds_one_modality_and_pads_far_less_than_mixed(study):
    keys = np.asarray(study.keys)[study.source_of(np.arange(study.total))]
    fractions = {}
    for batching in ("mixed", "modality", "length"):
        sampler = InterleavedSampler(study, seed=3, global_batch=8, batching=batching)
        order = sampler.order()
        if batching == "length":
            steps = order.reshape(-1, 8)
            # Whole blocks of one key first; the keys' few leftovers make the last step.
            assert all(len(set(keys[s])) == 1 for s in steps[:-1])
        fractions[batching] = _padding(order, study.lengths, batch=4)
    assert fractions["length"] < 0.25 * fractions["mixed"]
    assert fractions["length"] < 0.25 * fractions["modality"]


def test_length_batching_is_a_setting_and_needs_lengths():
    assert load_config(None, ["data.batching=length"]).data.batching == "length"
    with pytest.raises(ConfigError, match="length"):
        load_config(None, ["data.batching=longest"])
    with pytest.raises(ValueError, match="lengths"):
        InterleavedSampler(Interleaving([3, 4]), batching="length")
    with pytest.raises(ValueError, match="need 7 lengths"):
        Interleaving([3, 4], lengths=[1, 2])
