"""Packed records: what DataLoader workers read is the same record, held in two arrays."""

from __future__ import annotations

import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from umbrella_core.data.conversation import Tokenization
from umbrella_core.data.dataset import RecordDataset
from umbrella_core.data.packed import PackedItems, PackedRecords
from umbrella_core.model.tokenizer import build_byte_tokenizer
from umbrella_core.plugins import get_plugin_manager
from umbrella_core.types import ImageRef, StudyRecord, Turn

text = st.text(min_size=1, max_size=30)
optional = st.none() | text
phenotype = st.none() | st.booleans() | st.integers(-(10**9), 10**9) | text
phenotype |= st.floats(allow_nan=False, allow_infinity=False)


@st.composite
def records(draw):
    n_images = draw(st.integers(0, 2))
    images = [
        ImageRef(
            modality=draw(st.sampled_from(["t1", "fmri", "dmri"])),
            paths=draw(st.lists(text, min_size=1, max_size=2)),
        )
        for _ in range(n_images)
    ]
    user = "".join(["<image>\n"] * n_images) + draw(text)
    turns = [Turn(role="user", content=user), Turn(role="assistant", content=draw(text))]
    return StudyRecord(
        subject=draw(text),
        images=images,
        turns=turns,
        study=draw(text),
        session=draw(optional),
        split=draw(st.sampled_from([None, "train", "validation", "test"])),
        family=draw(optional),
        site=draw(optional),
        phenotypes=draw(st.dictionaries(text, phenotype, max_size=4)),
        source=draw(st.text(max_size=40)),
        laterality=draw(st.sampled_from([None, "refuse", "swap", "ignore"])),
        forbid_augment=draw(st.lists(text, max_size=2)),
    )


@settings(max_examples=60, deadline=None)
@given(st.lists(records(), max_size=8))
def test_packed_records_read_back_equal(originals):
    packed = PackedRecords(originals)
    assert len(packed) == len(originals)
    assert list(packed) == originals
    if originals:
        assert packed[-1] == originals[-1]
    with pytest.raises(IndexError):
        packed[len(originals)]


def test_a_phenotype_that_is_no_json_value_is_refused_naming_the_record():
    record = StudyRecord(
        subject="sub-01",
        images=[],
        turns=[Turn(role="user", content="Age?"), Turn(role="assistant", content="63")],
        phenotypes={"scan": object()},
        source="cohort.jsonl:7",
    )
    with pytest.raises(TypeError, match="cohort.jsonl:7"):
        PackedRecords([record])


def test_a_packed_dataset_gives_the_same_samples_in_a_worker_too(tmp_path):
    spec = get_plugin_manager().resolve_modality("t1").item.for_demo()
    originals = [
        StudyRecord(
            subject=f"sub-{i:03d}",
            images=[ImageRef(modality="t1", paths=[str(tmp_path / f"sub-{i:03d}_T1w.nii.gz")])],
            turns=[
                Turn(role="user", content="<image>\nHow old is the participant?"),
                Turn(role="assistant", content=f"{40 + i} years"),
            ],
            phenotypes={"age": 40 + i},
            source=f"manifest.jsonl:{i + 1}",
        )
        for i in range(200)
    ]
    specs = {"t1": spec}
    dataset = RecordDataset(
        originals, specs, Tokenization.of(build_byte_tokenizer(), 4, specs, 4096)
    )
    before = [dataset.encode(dataset.record(r)) for r, _ in dataset.items]
    dataset.pack()
    assert isinstance(dataset.records, PackedRecords) and isinstance(dataset.items, PackedItems)
    assert [dataset.encode(dataset.record(r)) for r, _ in dataset.items] == before
    assert [dataset.record(i) for i in range(len(originals))] == originals
    # What a worker started by spawn receives.
    copy = pickle.loads(pickle.dumps(dataset))
    assert list(copy.items) == list(dataset.items) and list(copy.records) == originals
    dataset.pack()  # twice: nothing changes
    assert list(dataset.records) == originals


def test_packed_items_keep_windows_and_single_samples():
    items = [(0, None), (1, 0), (1, 1), (1, 2), (2, None)]
    packed = PackedItems(items)
    assert len(packed) == 5 and list(packed) == items and packed[3] == (1, 2)
