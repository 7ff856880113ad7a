"""The assembled model: coverage exactness (I4), dispatch by name (I2), token counts (I3)."""

from __future__ import annotations

import pytest
import torch

from umbrella_core.data.collate import UmbrellaCollator
from umbrella_core.data.conversation import encode_conversation
from umbrella_core.errors import ModelError, TokenCountError
from umbrella_core.model.build import build_model, load_base, load_checkpoint, save_checkpoint
from umbrella_core.types import Turn


@pytest.fixture
def assembled(toy_pm):
    specs = {name: toy_pm.resolve_modality(name).item for name in ("dmri", "t1")}
    llava, tokenizer, _ = load_base("tiny")
    model = build_model(llava, specs, toy_pm.patch_embedder)
    return model, tokenizer, specs


def _item(tokenizer, model, images, answer="left"):
    placeholders = "".join("<image>" for _ in images)
    enc = encode_conversation(
        [
            Turn(role="user", content=f"{placeholders}\nWhich side?"),
            Turn(role="assistant", content=answer),
        ],
        [m for m, _ in images],
        tokenizer=tokenizer,
        image_token_id=model.image_token_id,
        tokens_per_modality={n: s.num_tokens for n, s in model.specs.items()},
        max_length=512,
    )
    key = "+".join(dict.fromkeys(m for m, _ in images))
    return {"input_ids": enc.input_ids, "labels": enc.labels, "images": list(images), "key": key}


def _batch(model, tokenizer, *items):
    return UmbrellaCollator(tokenizer.pad_token_id, model.modalities)(list(items))


@pytest.mark.parametrize("trainable", ["embedders", "projector", "full"])
def test_t1_only_batch_gives_every_trainable_parameter_a_gradient_and_dmri_exact_zero(
    assembled, trainable
):
    model, tokenizer, specs = assembled
    model.set_trainable(trainable)
    torch.manual_seed(0)
    batch = _batch(
        model,
        tokenizer,
        *[_item(tokenizer, model, [("t1", torch.randn(1, 8, 8, 8))]) for _ in range(3)],
    )
    out = model(**batch)
    assert torch.equal(out.loss, out.nll)  # the coverage term adds exactly 0.0, not 1e-7
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    dmri = model.embeddings.embedders["dmri"]
    assert all(torch.count_nonzero(p.grad) == 0 for p in dmri.parameters())
    t1 = model.embeddings.embedders["t1"]
    assert any(torch.count_nonzero(p.grad) > 0 for p in t1.parameters())


def test_sgd_step_on_t1_batch_leaves_dmri_embedder_bit_identical(assembled):
    model, tokenizer, _ = assembled
    model.set_trainable("full")
    before = {n: p.detach().clone() for n, p in model.embeddings.embedders.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    batch = _batch(model, tokenizer, _item(tokenizer, model, [("t1", torch.randn(1, 8, 8, 8))]))
    model(**batch).loss.backward()
    optimizer.step()
    for name, param in model.embeddings.embedders.named_parameters():
        if name.startswith("dmri."):
            assert torch.equal(param, before[name]), name
    assert any(
        not torch.equal(p, before[n])
        for n, p in model.embeddings.embedders.named_parameters()
        if n.startswith("t1.")
    )


def test_text_only_batch_keeps_vision_body_and_projector_in_the_graph(assembled):
    model, tokenizer, _ = assembled
    model.set_trainable("full")
    batch = _batch(model, tokenizer, _item(tokenizer, model, []))
    model(**batch).loss.backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []


def test_dmri_batch_of_3d_volumes_is_never_routed_to_t1(assembled):
    # Both toy modalities are 3D with the same shape: only the name can route them (I2).
    model, tokenizer, _ = assembled
    seen = {}

    def record(name):
        def hook(module, args, output):
            seen.setdefault(name, []).append(args[0].detach().clone())

        return hook

    for name, embedder in model.embeddings.embedders.items():
        embedder.register_forward_hook(record(name))
    volumes = torch.rand(2, 1, 8, 8, 8) + 1.0
    batch = _batch(model, tokenizer, *[_item(tokenizer, model, [("dmri", v)]) for v in volumes])
    out = model(**batch)
    assert torch.equal(seen["dmri"][0], volumes)
    # t1 runs only for coverage, on a single all-zero volume.
    assert len(seen["t1"]) == 1 and seen["t1"][0].shape[0] == 1 and not seen["t1"][0].any()
    assert set(out.image_features) == {"dmri"}


def test_embedders_run_in_canonical_order_every_step(assembled):
    model, tokenizer, _ = assembled
    order = []
    for name, embedder in model.embeddings.embedders.items():
        embedder.register_forward_hook(lambda m, a, o, name=name: order.append(name))
    model(**_batch(model, tokenizer, _item(tokenizer, model, [("t1", torch.rand(1, 8, 8, 8))])))
    model(**_batch(model, tokenizer, _item(tokenizer, model, [("dmri", torch.rand(1, 8, 8, 8))])))
    assert order == ["dmri", "t1", "dmri", "t1"]


def test_placeholder_and_feature_count_mismatch_is_a_clear_error(assembled):
    model, tokenizer, _ = assembled
    item = _item(tokenizer, model, [("t1", torch.rand(1, 8, 8, 8))])
    first = item["input_ids"].index(model.image_token_id)
    item["input_ids"] = (
        item["input_ids"][:first] + item["input_ids"][first + 1 :]
    )  # one token short
    item["labels"] = item["labels"][:-1]
    with pytest.raises(TokenCountError, match=r"7 image placeholder tokens but its images give 8"):
        model(**_batch(model, tokenizer, item))


def test_mixed_and_multi_image_batch_splices_each_image_at_its_placeholders(assembled):
    model, tokenizer, _ = assembled
    a, b, c = (torch.rand(1, 8, 8, 8) for _ in range(3))
    items = [
        _item(tokenizer, model, [("t1", a)]),
        _item(tokenizer, model, [("dmri", b), ("t1", c)]),
    ]
    batch = _batch(model, tokenizer, *items)
    model.eval()
    with torch.no_grad():
        features, _ = model.image_features(batch["pixel_values"])
        embeds = model.splice(batch["input_ids"], features, batch["image_modalities"])
    mask = batch["input_ids"] == model.image_token_id
    n = model.specs["t1"].num_tokens
    row1 = embeds[1][mask[1]]
    assert torch.allclose(embeds[0][mask[0]], features["t1"][0])
    assert torch.allclose(row1[:n], features["dmri"][0])  # placeholder order, not modality order
    assert torch.allclose(row1[n:], features["t1"][1])


def test_unknown_modality_in_batch_is_refused(assembled):
    model, _, _ = assembled
    with pytest.raises(ModelError, match="pet"):
        model.image_features({"pet": torch.zeros(1, 1, 8, 8, 8)})


def test_tiny_model_is_small_and_offline(assembled):
    model, tokenizer, _ = assembled
    assert sum(p.numel() for p in model.parameters()) < 5_000_000
    assert tokenizer.decode(tokenizer("Hémisphère gauche?")["input_ids"]) == "Hémisphère gauche?"


def test_from_pretrained_round_trip_of_a_saved_tiny_llava(tmp_path, toy_pm):
    llava, tokenizer, _ = load_base("tiny", seed=3)
    llava.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    loaded, loaded_tok, is_random = load_base(str(tmp_path / "base"))
    assert not is_random
    for (name, p), (_, q) in zip(
        llava.state_dict().items(), loaded.state_dict().items(), strict=False
    ):
        assert torch.equal(p, q), name
    assert loaded_tok("left")["input_ids"] == tokenizer("left")["input_ids"]
    specs = {"t1": toy_pm.resolve_modality("t1").item}
    model = build_model(loaded, specs, toy_pm.patch_embedder)
    item = _item(loaded_tok, model, [("t1", torch.rand(1, 8, 8, 8))])
    out = model(**UmbrellaCollator(loaded_tok.pad_token_id, ("t1",))([item]))
    assert torch.isfinite(out.loss)


def test_missing_model_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        load_base(str(tmp_path / "empty"))


def test_checkpoint_round_trip_and_missing_plugin(tmp_path, assembled, toy_pm):
    model, tokenizer, _ = assembled
    provenance = {"t1": ("p", "umbrella-t1", "0.1"), "dmri": ("p", "umbrella-dmri", "0.1")}
    save_checkpoint(model, tokenizer, tmp_path / "ckpt", provenance=provenance)
    assert not list(tmp_path.glob("*.pt")) and not list((tmp_path / "ckpt").glob("*.bin"))
    loaded, _, meta = load_checkpoint(tmp_path / "ckpt", toy_pm)
    for (name, p), (_, q) in zip(
        model.state_dict().items(), loaded.state_dict().items(), strict=False
    ):
        assert torch.equal(p, q), name
    from umbrella_core.testing import ToyModalityPlugin, fresh_plugin_manager

    only_t1 = fresh_plugin_manager(ToyModalityPlugin(toy_pm.resolve_modality("t1").item))
    with pytest.raises(ModelError, match="umbrella-dmri"):
        load_checkpoint(tmp_path / "ckpt", only_t1)


def test_loss_hook_terms_are_added_with_their_weight(toy_specs):
    from umbrella_core import LossTerm, hookimpl
    from umbrella_core.testing import ToyModalityPlugin, fresh_plugin_manager

    class FeatureNorm:
        @hookimpl
        def umbrella_loss_terms(self, modalities, settings):
            weight = settings.get("feature_norm", 0.0)
            return [
                LossTerm(
                    name="feature_norm",
                    weight=weight,
                    compute=lambda out, batch: sum(
                        f.pow(2).mean() for f in out.image_features.values()
                    ),
                )
            ]

    pm = fresh_plugin_manager(ToyModalityPlugin(*toy_specs), FeatureNorm())
    terms = pm.loss_terms(("dmri", "t1"), {"feature_norm": 0.5})
    specs = {name: pm.resolve_modality(name).item for name in ("dmri", "t1")}
    llava, tokenizer, _ = load_base("tiny")
    model = build_model(llava, specs, pm.patch_embedder, loss_terms=terms)
    batch = _batch(model, tokenizer, _item(tokenizer, model, [("t1", torch.rand(1, 8, 8, 8))]))
    out = model(**batch)
    expected = out.nll + 0.5 * out.terms["feature_norm"]
    assert out.terms["feature_norm"] > 0
    assert torch.allclose(out.loss, expected)


def test_a_loss_term_gets_the_batch_the_model_was_given(toy_specs):
    """A term written from docs/PLUGINS.md: every key of the documented ``Batch``, as collated."""

    from umbrella_core import Batch, LossTerm, hookimpl
    from umbrella_core.testing import ToyModalityPlugin, fresh_plugin_manager

    seen = []

    class Watcher:
        @hookimpl
        def umbrella_loss_terms(self, modalities, settings):
            def watch(outputs, batch):
                seen.append(batch)
                return outputs.nll * 0.0

            return [LossTerm(name="watch", compute=watch)]

    pm = fresh_plugin_manager(ToyModalityPlugin(*toy_specs), Watcher())
    specs = {name: pm.resolve_modality(name).item for name in ("dmri", "t1")}
    llava, tokenizer, _ = load_base("tiny")
    model = build_model(
        llava, specs, pm.patch_embedder, loss_terms=pm.loss_terms(("dmri", "t1"), {})
    )
    items = [
        _item(tokenizer, model, [("t1", torch.rand(1, 8, 8, 8))]),
        _item(tokenizer, model, [("dmri", torch.rand(1, 8, 8, 8)), ("t1", torch.rand(1, 8, 8, 8))]),
    ]
    items[0]["source"], items[1]["source"] = "m.jsonl:1", "m.jsonl:2"
    batch = _batch(model, tokenizer, *items)
    model(**batch)
    (given,) = seen
    assert set(given) == set(Batch.__required_keys__) == set(batch)
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(given[key], batch[key])
    assert given["sample_sources"] == ["m.jsonl:1", "m.jsonl:2"]
    assert given["sample_keys"] == ["t1", "dmri+t1"]
    assert given["image_modalities"] == batch["image_modalities"] == ["t1", "dmri", "t1"]
    assert {m: v.shape for m, v in given["pixel_values"].items()} == {
        "dmri": (1, 1, 8, 8, 8),
        "t1": (2, 1, 8, 8, 8),
    }
    assert given["image_places"] == batch["image_places"]


def test_forward_takes_only_the_batch_and_its_options(assembled):
    model, tokenizer, _ = assembled
    batch = _batch(model, tokenizer, _item(tokenizer, model, [("t1", torch.rand(1, 8, 8, 8))]))
    with pytest.raises(TypeError, match="num_items_in_batch"):
        model(**batch, num_items_in_batch=3)
