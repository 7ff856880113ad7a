"""The loss at learned positions only equals the full-logits loss, without full logits.

The reference is the way the loss used to be computed: Llava's logits at every
position, upcast to float32, cross-entropy with ``ignore_index``. The model now
computes logits only where labels are learned, in checkpointed chunks; users
must see the same loss, per-key losses, loss-hook terms and gradients.
"""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
import torch.nn.functional as F

from umbrella_core import LossTerm, hookimpl
from umbrella_core.constants import IGNORE_INDEX
from umbrella_core.errors import ModelError
from umbrella_core.model.build import build_model, load_base, tiny_llava_config
from umbrella_core.model.loss import UNIFORM_CHUNKS, LogitHead
from umbrella_core.testing import ToyModalityPlugin, fresh_plugin_manager

BIG_VOCAB = 262_144  # Gemma 3's


@functools.cache
def _big_llava(vocab):
    from transformers import LlavaForConditionalGeneration

    config = tiny_llava_config(
        vocab, vocab - 1, 0, hidden_size=32, vision_hidden_size=32, layers=1, heads=2
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        llava = LlavaForConditionalGeneration._from_config(config)
        with torch.no_grad():
            # Logits of a few units, as in a trained model, so that capping matters.
            llava.lm_head.weight.normal_(0.0, 1.0)
    return llava


def _model(pm, *, vocab=None, loss_terms=()):
    specs = {name: pm.resolve_modality(name).item for name in ("dmri", "t1")}
    # Building a 262k-token vocabulary takes seconds: build it once, copy it per test.
    llava = load_base("tiny")[0] if vocab is None else copy.deepcopy(_big_llava(vocab))
    model = build_model(llava, specs, pm.patch_embedder, loss_terms=loss_terms)
    model.set_trainable("full")
    return model


def _batch(model, *, learned=(5, 3), length=24, seed=0):
    """Two rows: an image each (t1, then dmri), ``learned`` answer tokens at the end."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.get_text_config().vocab_size
    n = model.specs["t1"].num_tokens
    ids = torch.randint(3, min(vocab - 1, 250), (2, length), generator=g)
    ids[:, 1 : 1 + n] = model.image_token_id
    labels = torch.full_like(ids, IGNORE_INDEX)
    for row, k in enumerate(learned):
        if k:
            labels[row, -k:] = ids[row, -k:]
    attention = torch.ones_like(ids)
    attention[1, :2] = 0  # a left-padded row
    shape = model.specs["t1"].input_shape
    return {
        "input_ids": ids,
        "attention_mask": attention,
        "labels": labels,
        "pixel_values": {
            "t1": torch.randn(1, *shape, generator=g),
            "dmri": torch.randn(1, *shape, generator=g),
        },
        "image_modalities": ["t1", "dmri"],
        "sample_keys": ["t1", "dmri"],
    }


def _reference(model, batch, *, cap=None):
    """The old way: full float32 logits at every position."""
    features, coverage = model.image_features(batch["pixel_values"])
    embeds = model.splice(batch["input_ids"], features, batch["image_modalities"])
    logits = model.llava(
        inputs_embeds=embeds, attention_mask=batch["attention_mask"], use_cache=False
    ).logits.float()
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    target = batch["labels"][:, 1:]
    token_loss = F.cross_entropy(
        logits[:, :-1].transpose(1, 2), target, ignore_index=IGNORE_INDEX, reduction="none"
    )
    learned = target != IGNORE_INDEX
    nll = token_loss.sum() / learned.sum().clamp(min=1)
    return nll + coverage, nll, token_loss, logits


def _grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_same_grads(model, new, ref):
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(new) == sorted(ref) == sorted(trainable)  # every parameter in the graph
    for name in trainable:
        # Relative to each gradient's scale: float32 sums over a 262k-token
        # vocabulary in another order differ by ~1e-4 of it (in float64 by 1e-13).
        scale = float(ref[name].abs().max())
        torch.testing.assert_close(new[name], ref[name], rtol=0, atol=3e-4 * scale + 1e-8, msg=name)


@pytest.fixture(params=["tiny", "vocab262k"])
def model(request, toy_pm):
    return _model(toy_pm, vocab=None if request.param == "tiny" else BIG_VOCAB).train()


@pytest.mark.parametrize("chunk", [None, 1, 3])
def test_loss_and_gradients_equal_the_full_logits_reference_whatever_the_chunk(model, chunk):
    batch = _batch(model)
    out = model(**batch, loss_chunk_size=chunk)
    new = _grads(model, out.loss)
    loss, nll, token_loss, _ = _reference(model, batch)
    ref = _grads(model, loss)
    torch.testing.assert_close(out.loss, loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.nll, nll, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.token_loss, token_loss, rtol=1e-5, atol=1e-5)
    assert out.logits is None  # training with labels: no full-vocabulary logits
    for row, key in enumerate(batch["sample_keys"]):
        learned = batch["labels"][row, 1:] != IGNORE_INDEX
        assert out.key_tokens[key] == int(learned.sum())
        expected = float(token_loss[row].detach().sum() / learned.sum())
        assert math.isclose(out.key_losses[key], expected, rel_tol=1e-5)
    _assert_same_grads(model, new, ref)


def test_softcapped_logits_match_a_capped_reference(toy_pm):
    model = _model(toy_pm, vocab=BIG_VOCAB).train()
    batch = _batch(model)
    uncapped = _reference(model, batch)[1]
    model.config.get_text_config().final_logit_softcapping = 3.0
    out = model(**batch, loss_chunk_size=2)
    new = _grads(model, out.loss)
    loss, nll, _, logits = _reference(model, batch, cap=3.0)
    ref = _grads(model, loss)
    assert abs(float(nll.detach()) - float(uncapped.detach())) > 0.1  # capping matters here
    torch.testing.assert_close(out.nll, nll, rtol=1e-5, atol=1e-6)
    _assert_same_grads(model, new, ref)
    with torch.no_grad():
        shown = model.eval()(**batch).logits
    torch.testing.assert_close(shown, logits, rtol=1e-5, atol=1e-5)
    assert float(shown.abs().max()) <= 3.0


def test_logit_scales_of_the_text_config_are_applied_or_refused(toy_pm):
    model = _model(toy_pm).eval()
    batch = _batch(model)
    with torch.no_grad():
        plain = model(**batch).logits
        model.config.get_text_config().logit_scale = 0.25  # Cohere
        torch.testing.assert_close(model(**batch).logits, plain * 0.25)
        model.config.get_text_config().logit_scale = -1.0
        with pytest.raises(ModelError, match="logit_scale"):
            model(**batch)
    config = model.config.get_text_config()
    config.logit_scale, config.logits_scaling = None, 4.0  # Granite divides
    assert LogitHead(model.llava.lm_head, config).scale == 0.25


def test_a_batch_without_learned_tokens_gives_zero_loss_and_exact_zero_gradients(model):
    batch = _batch(model, learned=(0, 0))
    out = model(**batch)
    assert float(out.loss.detach()) == 0.0 and float(out.nll.detach()) == 0.0
    assert torch.count_nonzero(out.token_loss) == 0
    new = _grads(model, out.loss)
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []  # DDP finds every parameter used (I4)
    assert all(torch.count_nonzero(g) == 0 for g in new.values())
    assert out.key_tokens == {"t1": 0, "dmri": 0}


def test_eval_outputs_give_per_position_hits_and_losses_without_asking_for_logits(model):
    model.eval()
    batch = _batch(model, learned=(6, 1))
    with torch.no_grad():
        _, _, token_loss, logits = _reference(model, batch)
        out = model(**batch, return_logits=False)
        shown = model(**batch).logits  # eval mode keeps logits by default
    assert out.logits is None
    target = batch["labels"][:, 1:]
    learned = target != IGNORE_INDEX
    expected = (logits[:, :-1].argmax(-1) == target) & learned
    assert torch.equal(out.token_correct, expected)
    torch.testing.assert_close(out.token_loss, token_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shown, logits, rtol=1e-5, atol=1e-5)
    # Generation: no labels, full logits.
    batch.pop("labels")
    with torch.no_grad():
        assert model(**batch).logits.shape == logits.shape


def test_training_gives_logits_and_hits_when_asked_or_when_a_loss_term_needs_them(toy_specs):
    seen = []

    class TopLogit:
        @hookimpl
        def umbrella_loss_terms(self, modalities, settings):
            def compute(out, batch):
                seen.append(out.logits)
                return out.logits[:, -1].float().logsumexp(-1).mean()

            return [LossTerm(name="top", weight=0.5, compute=compute, needs_logits=True)]

    pm = fresh_plugin_manager(ToyModalityPlugin(*toy_specs), TopLogit())
    model = _model(pm, loss_terms=pm.loss_terms(("dmri", "t1"), {})).train()
    batch = _batch(model)
    out = model(**batch, return_correct=True)
    _, nll, _, logits = _reference(model, batch)
    assert seen[-1] is out.logits and out.logits.requires_grad
    torch.testing.assert_close(out.logits.float(), logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, nll + 0.5 * out.terms["top"], rtol=1e-5, atol=1e-6)
    assert out.token_correct is not None and out.token_correct.dtype == torch.bool


def test_under_uniform_module_order_the_head_runs_as_often_whatever_the_learned_tokens(toy_pm):
    """DeepSpeed ZeRO-3 gathers the head's weight at every call: ranks must agree."""
    model = _model(toy_pm).train()
    model.uniform_module_order = True
    calls = []
    model.llava.lm_head.register_forward_hook(lambda *_: calls.append(1))
    counts = []
    for learned in [(5, 3), (0, 0), (17, 20)]:
        batch = _batch(model, learned=learned)
        calls.clear()
        out = model(**batch)
        new = _grads(model, out.loss)  # the backward pass recomputes each chunk
        counts.append(len(calls))
        if any(learned):
            ref = _grads(model, _reference(model, batch)[0])
            _assert_same_grads(model, new, ref)
    assert counts == [2 * UNIFORM_CHUNKS] * 3
