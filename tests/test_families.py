"""The tiny language-model families look like the real ones and survive a save and reload."""

from __future__ import annotations

from pathlib import Path

import pytest

from tiny_models.families import (
    FAMILIES,
    family_chat_template,
    family_config,
    family_tokenizer,
    save_tiny_language_model,
)
from umbrella_core.testing import modules_imported_by

CHAT = [
    {"role": "system", "content": "You are a careful radiologist."},
    {"role": "user", "content": "Which hemisphere holds the lesion?"},
    {"role": "assistant", "content": "left"},
    {"role": "user", "content": "How old is the subject?"},
    {"role": "assistant", "content": "63 years"},
]

#: (real vocabulary size, tied embeddings, bos, eos, pad, end of turn)
REAL = {
    "llama": (128256, False, "<|begin_of_text|>", "<|eot_id|>", None, "<|eot_id|>"),
    "qwen2": (151936, True, None, "<|im_end|>", "<|endoftext|>", "<|im_end|>"),
    "gemma3": (262144, True, "<bos>", "<eos>", "<pad>", "<end_of_turn>"),
    "phi3": (32064, False, "<s>", "<|endoftext|>", "<|endoftext|>", "<|end|>"),
    "smollm2": (49152, True, "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|im_end|>"),
}


def test_importing_the_families_imports_neither_torch_nor_transformers():
    # A fresh interpreter does not get pytest's pythonpath: it is given the folder.
    tests = str(Path(__file__).parent)
    loaded = modules_imported_by(
        f"import sys\nsys.path.insert(0, {tests!r})\nimport tiny_models.families",
        ("torch", "transformers", "tokenizers"),
    )
    assert loaded == []


def test_every_family_is_described():
    assert set(FAMILIES) == set(REAL)


@pytest.mark.parametrize("name", FAMILIES)
def test_tokenizer_has_the_family_conventions(name):
    vocab, _, bos, eos, pad, end_of_turn = REAL[name]
    tokenizer = family_tokenizer(name)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (bos, eos, pad)
    assert "<image>" not in tokenizer.get_vocab()  # the model builder adds it
    assert 800 <= len(tokenizer) < 1100
    # Words merge: the demo question is a handful of tokens, not one per character.
    question = tokenizer("Which hemisphere holds the lesion?", add_special_tokens=False)
    assert len(question["input_ids"]) <= 8
    # The real chat template, with the source named at the top.
    template = family_chat_template(name)
    assert tokenizer.chat_template == template
    assert template.startswith("{#-") and "Copied verbatim" in template.splitlines()[0]
    rendered = tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert end_of_turn in rendered and "63 years" in rendered
    ids = tokenizer.apply_chat_template(CHAT)["input_ids"]
    assert tokenizer.decode(ids) == rendered
    assert max(ids) < vocab


@pytest.mark.parametrize("name", FAMILIES)
def test_the_tokenizer_adds_bos_where_the_real_one_does(name):
    tokenizer = family_tokenizer(name)
    ids = tokenizer("left")["input_ids"]
    if name in ("llama", "gemma3", "phi3"):
        assert ids[0] == tokenizer.bos_token_id
    else:
        assert ids == tokenizer("left", add_special_tokens=False)["input_ids"]


def test_the_tokenizer_is_deterministic_and_fresh_each_call():
    first, second = family_tokenizer("qwen2"), family_tokenizer("qwen2")
    assert first.get_vocab() == second.get_vocab()
    first.add_special_tokens({"additional_special_tokens": ["<image>"]})
    assert "<image>" not in family_tokenizer("qwen2").get_vocab()


@pytest.mark.parametrize("name", FAMILIES)
def test_config_has_the_real_vocabulary_and_tying(name):
    vocab, tied, *_ = REAL[name]
    config = family_config(name)
    tokenizer = family_tokenizer(name)
    assert config.vocab_size == vocab
    assert config.tie_word_embeddings is tied
    assert config.bos_token_id == tokenizer.bos_token_id
    assert config.eos_token_id == tokenizer.eos_token_id
    assert config.pad_token_id == tokenizer.pad_token_id
    assert max(tokenizer.get_vocab().values()) < config.vocab_size
    assert family_config(name, hidden_size=32, heads=2, kv_heads=1).hidden_size == 32


def test_bad_family_or_vocabulary_is_refused():
    with pytest.raises(ValueError, match="unknown language-model family 'gpt5'.*llama"):
        family_tokenizer("gpt5")
    with pytest.raises(ValueError, match="vocab_size 100 is smaller"):
        family_config("llama", vocab_size=100)


@pytest.mark.parametrize("name", FAMILIES)
def test_saved_model_and_tokenizer_reload(name, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, tied, *_ = REAL[name]
    before = torch.random.get_rng_state()
    out = save_tiny_language_model(name, tmp_path / name, vocab_size=1024)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert (out / "model.safetensors").is_file()
    assert not list(out.glob("*.bin"))  # no pickle (I7)
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.vocab_size == 1024
    shared = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert shared is tied
    original = family_tokenizer(name)
    assert tokenizer.chat_template == original.chat_template
    reloaded_ids = tokenizer.apply_chat_template(CHAT)["input_ids"]
    assert reloaded_ids == original.apply_chat_template(CHAT)["input_ids"]
    ids = torch.tensor([tokenizer.apply_chat_template(CHAT)["input_ids"]])
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], 1024)


def test_same_seed_same_weights(tmp_path):
    from safetensors.torch import load_file

    a = save_tiny_language_model("smollm2", tmp_path / "a", seed=3, vocab_size=1024)
    b = save_tiny_language_model("smollm2", tmp_path / "b", seed=3, vocab_size=1024)
    c = save_tiny_language_model("smollm2", tmp_path / "c", seed=4, vocab_size=1024)
    wa, wb, wc = (load_file(p / "model.safetensors") for p in (a, b, c))
    assert all((wa[k] == wb[k]).all() for k in wa)
    assert any((wa[k] != wc[k]).any() for k in wa)
