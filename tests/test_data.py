"""Manifests, conversation encoding, the collator and the interleaver."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from umbrella_core.constants import IGNORE_INDEX
from umbrella_core.data.collate import UmbrellaCollator
from umbrella_core.data.conversation import encode_conversation
from umbrella_core.data.interleave import Interleaving
from umbrella_core.data.manifest import read_manifest
from umbrella_core.errors import DataError, TokenCountError
from umbrella_core.model.tokenizer import build_byte_tokenizer
from umbrella_core.types import Turn

RECORD = {
    "subject": "sub-01",
    "images": [
        {"modality": "t1", "path": "anat/sub-01_T1w.nii.gz"},
        {"modality": "dmri", "path": ["dwi/sub-01_FA.nii.gz", "dwi/sub-01_MD.nii.gz"]},
    ],
    "conversation": [
        {"role": "user", "content": "<image><image>\nCompare."},
        {"role": "assistant", "content": "Similar."},
    ],
    "phenotypes": {"age": 63},
}


@pytest.fixture(scope="module")
def tokenizer():
    return build_byte_tokenizer()


def test_jsonl_and_json_manifests_give_the_same_records(tmp_path):
    (tmp_path / "m.jsonl").write_text(
        json.dumps(RECORD) + "\n\n" + json.dumps(RECORD | {"subject": "sub-02"}) + "\n"
    )
    (tmp_path / "m.json").write_text(json.dumps({"study": "cohort", "records": [RECORD]}))
    jsonl = list(read_manifest(tmp_path / "m.jsonl"))
    (record,) = list(read_manifest(tmp_path / "m.json"))
    assert [r.subject for r in jsonl] == ["sub-01", "sub-02"]
    assert record.study == "cohort" and record.phenotypes == {"age": 63}
    assert record.images[0].paths == (str(tmp_path / "anat/sub-01_T1w.nii.gz"),)
    assert len(record.images[1].paths) == 2 and record.modalities == ("t1", "dmri")
    assert jsonl[1].source.endswith("m.jsonl:3")


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", r"m.jsonl:2: invalid JSON"),
        (
            json.dumps({k: v for k, v in RECORD.items() if k != "subject"}),
            r"m.jsonl:2: field 'subject' is missing",
        ),
        (
            json.dumps(RECORD | {"conversation": RECORD["conversation"][:1]}),
            r"m.jsonl:2: .*no assistant turn",
        ),
        (
            json.dumps(RECORD | {"images": RECORD["images"][:1]}),
            r"m.jsonl:2: .*2 <image> placeholder\(s\) but the record lists 1",
        ),
        (
            json.dumps(RECORD | {"conversation": [{"role": "robot", "content": "x"}]}),
            r"conversation\[0\].role",
        ),
    ],
)
def test_bad_manifest_lines_name_file_line_and_field(tmp_path, line, message):
    (tmp_path / "m.jsonl").write_text(json.dumps(RECORD) + "\n" + line + "\n")
    with pytest.raises(DataError, match=message):
        list(read_manifest(tmp_path / "m.jsonl"))


def test_empty_manifest_is_an_error(tmp_path):
    (tmp_path / "m.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no records"):
        list(read_manifest(tmp_path / "m.jsonl"))


def test_encoding_expands_each_placeholder_to_its_modality_token_count_and_masks_labels(tokenizer):
    enc = encode_conversation(
        [
            Turn(role="user", content="<image> and <image>?"),
            Turn(role="assistant", content="yes"),
            Turn(role="user", content="sure?"),
            Turn(role="assistant", content="no"),
        ],
        ["t1", "fmri"],
        tokenizer=tokenizer,
        image_token_id=4,
        tokens_per_modality={"t1": 5, "fmri": 7},
        max_length=512,
    )
    assert enc.input_ids.count(4) == 12
    learned = [t for t, lab in zip(enc.input_ids, enc.labels, strict=True) if lab != IGNORE_INDEX]
    assert tokenizer.decode(learned) == "yes</s>no</s>"


def test_too_long_conversation_and_placeholder_mismatch(tokenizer):
    turns = [Turn(role="user", content="<image>"), Turn(role="assistant", content="ok")]
    with pytest.raises(DataError, match="at most 20"):
        encode_conversation(
            turns,
            ["t1"],
            tokenizer=tokenizer,
            image_token_id=4,
            tokens_per_modality={"t1": 64},
            max_length=20,
            where="m.jsonl:3",
        )
    with pytest.raises(TokenCountError, match="2 image"):
        encode_conversation(
            turns,
            ["t1", "t1"],
            tokenizer=tokenizer,
            image_token_id=4,
            tokens_per_modality={"t1": 4},
            max_length=512,
        )


def test_collator_groups_a_mixed_batch_by_modality_and_pads(tokenizer):
    t1_a, t1_b, dmri = torch.rand(1, 8, 8, 8), torch.rand(1, 8, 8, 8), torch.rand(2, 8, 8, 8)
    items = [
        {"input_ids": [1, 5, 6], "labels": [-100, -100, 6], "images": [("t1", t1_a)], "key": "t1"},
        {
            "input_ids": [1, 7, 8, 9, 10],
            "labels": [-100, -100, 8, 9, 10],
            "images": [("dmri", dmri), ("t1", t1_b)],
            "key": "dmri+t1",
        },
        {"input_ids": [1, 2], "labels": [-100, 2], "images": [], "key": "text"},
    ]
    batch = UmbrellaCollator(pad_token_id=0, modality_order=("dmri", "fmri", "t1"))(items)
    assert batch["input_ids"].shape == (3, 5)
    assert batch["input_ids"][0].tolist() == [1, 5, 6, 0, 0]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1] * 5, [1, 1, 0, 0, 0]]
    assert batch["labels"][0].tolist() == [-100, -100, 6, -100, -100]
    assert list(batch["pixel_values"]) == ["dmri", "t1"]  # canonical order, absent fmri left out
    assert torch.equal(batch["pixel_values"]["t1"], torch.stack([t1_a, t1_b]))
    assert batch["pixel_values"]["dmri"].shape == (1, 2, 8, 8, 8)
    assert batch["image_modalities"] == ["t1", "dmri", "t1"]
    assert batch["sample_keys"] == ["t1", "dmri+t1", "text"]


def test_interleaving_is_deterministic_weighted_and_covers_each_source():
    mix = Interleaving([100, 20], weights=[1.0, 1.0])
    a, b = mix.epoch_order(seed=3, epoch=0), mix.epoch_order(seed=3, epoch=0)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, mix.epoch_order(seed=3, epoch=1))
    share_small = np.mean(a >= 100)
    assert 0.4 < share_small < 0.6  # equal weights despite 5x fewer samples
    small = a[a >= 100]
    # The small source is drawn in whole permutations: each index once per pass.
    assert sorted(small[:20].tolist()) == list(range(100, 120))
    proportional = Interleaving([100, 20]).epoch_order(seed=0, epoch=0)
    assert sorted(proportional.tolist()) == list(range(120))  # by size: each sample once per epoch


def test_study_weights_split_draws_between_studies_by_weight(tmp_path, toy_pm):
    from umbrella_core.config import load_config
    from umbrella_core.data.demo import write_demo
    from umbrella_core.train.run import prepare

    spec = toy_pm.resolve_modality("t1").item
    big = write_demo(tmp_path / "big", {"t1": spec}, subjects=40)
    small = write_demo(tmp_path / "small", {"t1": spec}, subjects=10)
    studies = json.dumps(
        [{"location": str(big), "weight": 1.0}, {"location": str(small), "weight": 3.0}]
    )
    config = load_config(None, [f"data.studies={studies}", "data.modalities=t1"])
    prep = prepare(config, toy_pm, log=lambda _: None)
    sizes = [len(ds) for ds in prep.train_sets]
    assert sizes == [28, 7]  # a tenth of each for validation, a fifth for test
    assert prep.weights[1] / prep.weights[0] == pytest.approx(3.0)
    unweighted = prepare(
        load_config(
            None, [f"data.studies={json.dumps([str(big), str(small)])}", "data.modalities=t1"]
        ),
        toy_pm,
        log=lambda _: None,
    )
    assert unweighted.weights == [28.0, 7.0]  # by size


def test_an_image_found_bad_only_when_decoded_names_its_record_and_the_check(tmp_path):
    """data.check: files reads headers only: truncated voxel data surfaces at the sample's
    first read, mid-run; the error names the record's line and data.check=full."""
    from umbrella_core.data.conversation import Tokenization
    from umbrella_core.data.dataset import RecordDataset
    from umbrella_core.imaging import save_nifti
    from umbrella_core.plugins import get_plugin_manager
    from umbrella_core.types import ImageRef, StudyRecord

    spec = get_plugin_manager().resolve_modality("t1").item.for_demo()
    path = tmp_path / "sub-01_T1w.nii.gz"
    save_nifti(path, np.random.default_rng(0).random((32, 32, 32)).astype(np.float32), np.eye(4))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    record = StudyRecord(
        subject="sub-01",
        images=[ImageRef(modality="t1", paths=str(path))],
        turns=[Turn(role="user", content="<image>\nSide?"), Turn(role="gpt", content="left")],
        source="manifest.jsonl:7",
    )
    tokenizer = build_byte_tokenizer()
    specs = {"t1": spec}
    dataset = RecordDataset([record], specs, Tokenization.of(tokenizer, 4, specs, 4096))
    with pytest.raises(DataError) as caught:
        dataset[0]
    message = str(caught.value)
    assert message.startswith("manifest.jsonl:7: ") and "sub-01_T1w.nii.gz" in message
    assert message.endswith("data.check=full (or umbrella validate) finds such files before step 1")
