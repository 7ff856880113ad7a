"""The typed batch: each image lands at its own placeholder, by the batch's record (I3)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from umbrella_core import Batch
from umbrella_core.data.collate import UmbrellaCollator
from umbrella_core.data.conversation import encode_conversation
from umbrella_core.errors import TokenCountError
from umbrella_core.model.build import build_model, load_base
from umbrella_core.testing import ToyModalityPlugin, fresh_plugin_manager, toy_modality
from umbrella_core.types import Turn


@pytest.fixture(scope="module")
def model_and_tokenizer():
    # Token counts differ: a t1 image is 8 tokens, a dmri image 4.
    pm = fresh_plugin_manager(
        ToyModalityPlugin(
            toy_modality("t1", channels=1),
            toy_modality("dmri", channels=1, patch_size=(8, 4, 4)),
        )
    )
    specs = {name: pm.resolve_modality(name).item for name in ("dmri", "t1")}
    llava, tokenizer, _ = load_base("tiny")
    model = build_model(llava, specs, pm.patch_embedder)
    model.eval()
    return model, tokenizer


def _item(model, tokenizer, images, source):
    # One line per image: each image's placeholders are a run of their own.
    placeholders = "".join("<image>\n" for _ in images)
    enc = encode_conversation(
        [
            Turn(role="user", content=f"{placeholders}Which side?"),
            Turn(role="assistant", content="left"),
        ],
        [m for m, _ in images],
        tokenizer=tokenizer,
        image_token_id=model.image_token_id,
        tokens_per_modality={n: s.num_tokens for n, s in model.specs.items()},
        max_length=512,
    )
    return {
        "input_ids": enc.input_ids,
        "labels": enc.labels,
        "images": list(images),
        "key": "+".join(dict.fromkeys(m for m, _ in images)) or "text",
        "source": source,
    }


@pytest.fixture(scope="module")
def batch(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    torch.manual_seed(0)
    a, c, d = (torch.rand(1, 8, 8, 8) * (i + 1) for i in range(3))  # t1, different content
    b, e = (torch.rand(1, 8, 8, 8) + i for i in range(2))  # dmri
    items = [
        _item(model, tokenizer, [("t1", a)], "m.jsonl:1"),
        _item(model, tokenizer, [("dmri", b), ("t1", c)], "m.jsonl:2"),
        _item(model, tokenizer, [("t1", d), ("dmri", e)], "m.jsonl:3"),
    ]
    return UmbrellaCollator(tokenizer.pad_token_id, model.modalities)(items)


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def _restacked(batch, order):
    """``batch`` with each modality's images stacked in ``order[m]``, the record following."""
    out = dict(batch)
    out["pixel_values"] = {m: t[order[m]] for m, t in batch["pixel_values"].items()}
    out["image_places"] = {
        m: [places[i] for i in order[m]] for m, places in batch["image_places"].items()
    }
    return out


def test_the_collator_gives_a_batch_with_each_images_place_and_each_samples_source(batch):
    assert set(batch) == set(Batch.__annotations__)
    assert batch["image_places"] == {"dmri": [(1, 0), (2, 1)], "t1": [(0, 0), (1, 1), (2, 0)]}
    assert batch["image_modalities"] == ["t1", "dmri", "t1", "t1", "dmri"]
    assert batch["sample_keys"] == ["t1", "dmri+t1", "t1+dmri"]
    assert batch["sample_sources"] == ["m.jsonl:1", "m.jsonl:2", "m.jsonl:3"]


def test_images_stacked_in_another_order_land_at_the_same_placeholders(model_and_tokenizer, batch):
    model, _ = model_and_tokenizer
    expected = _logits(model, batch)
    shuffled = _restacked(batch, {"t1": [2, 0, 1], "dmri": [1, 0]})
    assert torch.allclose(_logits(model, shuffled), expected, atol=1e-6)
    # The record is what keeps them in place: without it the same stacking
    # puts the images at other samples' placeholders, and the answers change.
    del shuffled["image_places"]
    assert not torch.allclose(_logits(model, shuffled), expected, atol=1e-3)


def test_each_images_features_are_at_its_own_placeholder_run(model_and_tokenizer, batch):
    model, _ = model_and_tokenizer
    shuffled = _restacked(batch, {"t1": [2, 0, 1], "dmri": [1, 0]})
    with torch.no_grad():
        features, _ = model.image_features(shuffled["pixel_values"])
        embeds = model.splice(
            shuffled["input_ids"],
            features,
            shuffled["image_modalities"],
            shuffled["image_places"],
        )
    mask = shuffled["input_ids"] == model.image_token_id
    row2 = embeds[2][mask[2]]
    # Row 2 is [t1 d, dmri e]; d is t1 image 0 of that stack, e dmri image 0.
    assert torch.equal(row2[:8], features["t1"][0].to(row2.dtype))
    assert torch.equal(row2[8:], features["dmri"][0].to(row2.dtype))


def _disagreeing(batch, **changes):
    out = dict(batch)
    out["image_places"] = {**batch["image_places"], **changes}
    return out


@pytest.mark.parametrize(
    ("places", "image_modalities", "message"),
    [
        # Row 1 is [dmri, t1]: a record that puts the t1 image first does not
        # fit the placeholder runs (4 tokens, then 8), even when the listed
        # modalities agree with the record.
        (
            {"dmri": [(1, 1), (2, 1)], "t1": [(0, 0), (1, 0), (2, 0)]},
            ["t1", "t1", "dmri", "t1", "dmri"],
            r"row 1: image 0 \(t1, 8 tokens\) does not fit its placeholder run; "
            r"the row's image placeholders are \[4, 8\] tokens long",
        ),
        # The record fits, but the listed modalities say otherwise.
        (
            {},
            ["t1", "t1", "dmri", "t1", "dmri"],
            r"lists its images' modalities as \['t1', 't1', 'dmri', 't1', 'dmri'\] in "
            r"placeholder order, but its placement record puts "
            r"\['t1', 'dmri', 't1', 't1', 'dmri'\] there",
        ),
        # Two images at one placeholder, none at another.
        (
            {"t1": [(0, 0), (0, 0), (2, 0)]},
            None,
            r"row 0: image 0 is placed twice",
        ),
        # An image placed in a row the batch does not have.
        ({"t1": [(0, 0), (1, 1), (3, 0)]}, None, r"placed in row 3; the batch has 3"),
        # Fewer places than images.
        ({"t1": [(0, 0), (1, 1)]}, None, r"3 t1 image\(s\) but places 2"),
    ],
)
def test_a_record_that_disagrees_with_the_placeholders_is_a_clear_error(
    model_and_tokenizer, batch, places, image_modalities, message
):
    model, _ = model_and_tokenizer
    wrong = _disagreeing(batch, **places)
    if image_modalities is not None:
        wrong["image_modalities"] = image_modalities
    with pytest.raises(TokenCountError, match=message):
        _logits(model, wrong)


def test_the_trainer_moves_the_batch_and_calls_the_model_with_all_its_keys(
    model_and_tokenizer, batch
):
    # What transformers' Trainer does with a batch: _prepare_inputs, then model(**inputs).
    from transformers import Trainer

    class Prepare:
        args = SimpleNamespace(device=torch.device("cpu"))
        is_deepspeed_enabled = False
        _prepare_input = Trainer._prepare_input

    model, _ = model_and_tokenizer
    prepared = Prepare()._prepare_input(batch)
    assert set(prepared) == set(batch)
    assert prepared["image_places"] == batch["image_places"]
    assert torch.equal(_logits(model, prepared), _logits(model, batch))
