"""Composing from a pretrained language model, and starting from existing LLaVA checkpoints.

Every family of :mod:`tiny_models.families` (Llama 3, Qwen2.5, Gemma 3,
Phi-3, SmolLM2 with tied embeddings) at its real vocabulary size, every vision
option (fresh, none, a CLIP or SigLIP folder) and every LLaVA layout (CLIP
llava-1.5, SigLIP llava-interleave and LLaVA-OneVision), all saved with
``save_pretrained`` and loaded from local folders, as a user's would be.
"""

from __future__ import annotations

import math

import pytest
import torch

from tiny_models.families import FAMILIES, family_config, save_tiny_language_model
from tiny_models.llava import LLAVA_LAYOUTS, save_tiny_llava, save_tiny_vision_tower
from umbrella_core.config import load_config
from umbrella_core.errors import ConfigError, ModelError
from umbrella_core.model.build import save_checkpoint
from umbrella_core.model.start import auto_trainable, load_tokenizer, start_model

PROVENANCE = {"t1": ("t1", "umbrella-t1", "0"), "dmri": ("dmri", "umbrella-dmri", "0")}
TIED = {"llama": False, "qwen2": True, "gemma3": True, "phi3": False, "smollm2": True}


@pytest.fixture(scope="module")
def language_models(tmp_path_factory):
    """Each family's tiny model at its real vocabulary size, saved as a user's folder."""
    root = tmp_path_factory.mktemp("lm")
    return {
        family: save_tiny_language_model(
            family, root / family, hidden_size=32, intermediate_size=64
        )
        for family in FAMILIES
    }


def _config(*settings):
    return load_config(None, list(settings)).model


def _batch(model, tokenizer, specs, *, seed=0):
    """One sample per modality: text, the image placeholders, an answer that is learned."""
    generator = torch.Generator().manual_seed(seed)
    rows, images, modalities = [], {}, []
    for name, spec in specs.items():
        prompt = tokenizer("Which hemisphere?", add_special_tokens=False)["input_ids"]
        answer = tokenizer(" left", add_special_tokens=False)["input_ids"]
        ids = [model.image_token_id] * spec.num_tokens + prompt + answer + [tokenizer.eos_token_id]
        rows.append((ids, len(ids) - len(answer) - 1))
        images[name] = torch.randn((1, *spec.input_shape), generator=generator)
        modalities.append(name)
    length = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), length), tokenizer.pad_token_id)
    labels = torch.full((len(rows), length), -100)
    attention = torch.zeros((len(rows), length), dtype=torch.long)
    for i, (ids, start) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, start : len(ids)] = torch.tensor(ids[start:])
        attention[i, : len(ids)] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention,
        "labels": labels,
        "pixel_values": images,
        "image_modalities": modalities,
    }


def _trainable_all_get_gradients(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    return [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]


# -- composing from each family ------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_composes_trains_saves_and_loads_again(
    family, language_models, toy_specs, toy_pm, tmp_path
):
    from transformers import AutoModelForCausalLM

    specs = {s.name: s for s in toy_specs}
    folder = language_models[family]
    config = _config(
        f"model.language={folder}", "model.vision_hidden_size=32", "model.trainable=projector"
    )
    started = start_model(config, specs, toy_pm)
    model, tokenizer = started.model, started.tokenizer
    # LLaVA's stage 1: the embedders, the new projector and the fresh (random) vision body.
    assert (started.kind, started.trainable) == ("composed", "projector")
    groups = model.parameter_groups()
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert groups["vision"]
    assert trainable == {id(p) for g in ("embedders", "projector", "vision") for p in groups[g]}

    # The language model is the saved one, weight for weight, tied where the family ties.
    original = AutoModelForCausalLM.from_pretrained(folder)
    for name, value in original.get_decoder().state_dict().items():
        assert torch.equal(model.language_model.state_dict()[name], value), name
    head = model.llava.get_output_embeddings().weight
    assert torch.equal(head, original.get_output_embeddings().weight)
    assert (head is model.llava.get_input_embeddings().weight) == TIED[family]
    # The real vocabulary has room for <image>: no resize, no new random rows.
    assert head.shape[0] == family_config(family).vocab_size
    assert model.image_token_id == tokenizer.convert_tokens_to_ids("<image>") < head.shape[0]
    assert tokenizer.pad_token_id is not None  # Llama 3 has none: padding uses eos

    batch = _batch(model, tokenizer, specs)
    assert _trainable_all_get_gradients(model, batch) == []
    with torch.no_grad():
        logits = model(**batch, return_logits=True).logits

    save_checkpoint(model, tokenizer, tmp_path / "ckpt", provenance=PROVENANCE)
    again = start_model(_config(f"model.base={tmp_path / 'ckpt'}"), specs, toy_pm)
    assert (again.kind, again.trainable) == ("checkpoint", "embedders")
    reloaded = again.model
    # Stage 2 goes on from here: the vision body is still UMBRELLA's own.
    assert reloaded.vision_is_new
    head = reloaded.llava.get_output_embeddings().weight
    assert (head is reloaded.llava.get_input_embeddings().weight) == TIED[family]
    with torch.no_grad():
        assert torch.equal(reloaded(**batch, return_logits=True).logits, logits)
    # The checkpoint's tokenizer keeps the family's chat template.
    assert again.tokenizer.chat_template == tokenizer.chat_template


def test_gemma_scales_text_embeddings_but_not_image_features(language_models, toy_specs, toy_pm):
    specs = {s.name: s for s in toy_specs}
    config = _config(f"model.language={language_models['gemma3']}", "model.vision_hidden_size=32")
    model = start_model(config, specs, toy_pm).model
    tokenizer_batch = _batch(model, start_model(config, specs, toy_pm).tokenizer, specs)
    ids = tokenizer_batch["input_ids"][:1]
    features, _ = model.image_features({"t1": tokenizer_batch["pixel_values"]["t1"]})
    embeds = model.splice(ids, features, ["t1"])
    raw = model.language_model.embed_tokens.weight[ids[0]]
    text = ids[0] != model.image_token_id
    hidden = model.language_model.config.hidden_size
    assert torch.allclose(embeds[0, text], raw[text] * math.sqrt(hidden), rtol=1e-3)
    assert torch.equal(embeds[0, ~text], features["t1"][0])


# -- vision bodies ---------------------------------------------------------------


def test_vision_none_feeds_the_embedders_straight_into_the_projector(
    language_models, toy_specs, toy_pm
):
    specs = {s.name: s for s in toy_specs}
    config = _config(
        f"model.language={language_models['llama']}",
        "model.vision=none",
        "model.vision_hidden_size=24",
        "model.trainable=full",
    )
    model = start_model(config, specs, toy_pm).model
    groups = model.parameter_groups()
    assert groups["vision"] == []
    assert model.llava.model.multi_modal_projector.linear_1.in_features == 24
    tokens = model.embeddings.embed("t1", torch.randn((1, *specs["t1"].input_shape)))
    assert torch.equal(model._vision_body(tokens), model.llava.model.multi_modal_projector(tokens))
    # Full training: every parameter that trains is used (DDP needs no unused-parameter search).
    batch = _batch(model, start_model(config, specs, toy_pm).tokenizer, specs)
    assert _trainable_all_get_gradients(model, batch) == []


def test_vision_fresh_has_the_configured_layers(language_models, toy_specs, toy_pm):
    specs = {s.name: s for s in toy_specs}
    config = _config(
        f"model.language={language_models['qwen2']}",
        "model.vision_hidden_size=64",
        "model.vision_layers=3",
    )
    model = start_model(config, specs, toy_pm).model
    tower = model.llava.model.vision_tower
    assert len(tower.encoder.layers) == 3 and tower.config.hidden_size == 64
    assert model.embeddings.embed("t1", torch.zeros((1, *specs["t1"].input_shape))).shape[-1] == 64


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_a_pretrained_vision_tower_keeps_its_layers(
    kind, language_models, toy_specs, toy_pm, tmp_path
):
    from transformers import AutoModel

    specs = {s.name: s for s in toy_specs}
    folder = save_tiny_vision_tower(kind, tmp_path / kind, hidden_size=32, layers=2, seed=4)
    config = _config(
        f"model.language={language_models['llama']}",
        f"model.vision={folder}",
        "model.trainable=full",
    )
    started = start_model(config, specs, toy_pm)
    model = started.model
    saved = AutoModel.from_pretrained(folder)
    for mine, theirs in zip(
        model.llava.model.vision_tower.encoder.layers, saved.encoder.layers, strict=True
    ):
        for (name, p), (_, q) in zip(
            mine.state_dict().items(), theirs.state_dict().items(), strict=True
        ):
            assert torch.equal(p, q), name
    # The 2D patch embedding is replaced by the 3D embedders; the pooled-output
    # parts LLaVA never runs (post_layernorm, SigLIP's head) never train.
    unused = {id(p) for p in model.parameter_groups()["unused"]}
    assert {id(p) for p in model.llava.model.vision_tower.post_layernorm.parameters()} <= unused
    batch = _batch(model, started.tokenizer, specs)
    assert _trainable_all_get_gradients(model, batch) == []


# -- existing LLaVA checkpoints ----------------------------------------------------


@pytest.mark.parametrize("layout", list(LLAVA_LAYOUTS))
def test_llava_checkpoints_of_each_layout_train_and_reload(layout, toy_specs, toy_pm, tmp_path):
    specs = {s.name: s for s in toy_specs}
    folder = save_tiny_llava(layout, tmp_path / layout)
    started = start_model(_config(f"model.base={folder}"), specs, toy_pm)
    assert (started.kind, started.trainable) == ("llava", "embedders")
    assert "projector" in started.reason
    full = start_model(_config(f"model.base={folder}", "model.trainable=full"), specs, toy_pm)
    model, tokenizer = full.model, full.tokenizer
    batch = _batch(model, tokenizer, specs)
    # Every trainable parameter is in the graph, whatever the layout runs.
    assert _trainable_all_get_gradients(model, batch) == []
    if layout == "llava-1.5":
        # Features come from the penultimate layer: the last one never runs, never trains.
        last = model.llava.model.vision_tower.encoder.layers[-1]
        assert not any(p.requires_grad for p in last.parameters())
    with torch.no_grad():
        logits = model(**batch, return_logits=True).logits
    save_checkpoint(model, tokenizer, tmp_path / "ckpt", provenance=PROVENANCE)
    again = start_model(_config(f"model.base={tmp_path / 'ckpt'}"), specs, toy_pm).model
    assert type(again.llava) is type(model.llava)
    with torch.no_grad():
        assert torch.equal(again(**batch, return_logits=True).logits, logits)


# -- choices and errors ---------------------------------------------------------------


def test_auto_trainable_follows_what_the_run_starts_from():
    assert auto_trainable("tiny")[0] == "full"
    # One run of a composed model (train() alone; umbrella train runs two stages).
    assert auto_trainable("composed")[0] == "lora"
    assert auto_trainable("llava")[0] == "embedders"
    assert auto_trainable("checkpoint")[0] == "embedders"


def test_validate_reads_the_composed_tokenizer_without_the_weights(language_models):
    tokenizer, image_id = load_tokenizer(_config(f"model.language={language_models['phi3']}"))
    assert tokenizer.convert_tokens_to_ids("<image>") == image_id
    assert tokenizer.chat_template


def test_bad_model_settings_are_one_line_errors(language_models, toy_specs, toy_pm, tmp_path):
    specs = {s.name: s for s in toy_specs}
    llava = save_tiny_llava("llava-interleave", tmp_path / "llava")
    llama = language_models["llama"]
    with pytest.raises(ConfigError, match="both name a model"):
        start_model(_config(f"model.language={llama}", f"model.base={llava}"), specs, toy_pm)
    with pytest.raises(ConfigError, match="vision-language model"):
        start_model(_config(f"model.language={llava}"), specs, toy_pm)
    with pytest.raises(ModelError, match="use model.language|with model.language"):
        start_model(_config(f"model.base={llama}"), specs, toy_pm)
    # A folder that is not there is an error, never a download from a hub (I8).
    with pytest.raises(ModelError, match="no such folder"):
        start_model(_config(f"model.language={tmp_path / 'missing'}"), specs, toy_pm)
    with pytest.raises(ConfigError, match="neither a CLIP nor a SigLIP"):
        start_model(_config(f"model.language={llama}", f"model.vision={llama}"), specs, toy_pm)


def test_a_two_stage_recipe_composes_in_stage_one_and_goes_on_from_its_weights(tmp_path):
    from umbrella_core.config import RunConfig, structure
    from umbrella_core.train.recipes import recipe_stages, stage_configs

    config = load_config(None, ["model.language=/models/lm", f"trainer.output_dir={tmp_path}"])
    data = config.to_dict()
    data["stages"] = list(recipe_stages("two-stage"))
    first, second = stage_configs(structure(RunConfig, data))
    assert (first.model.language, first.model.trainable) == ("/models/lm", "projector")
    assert second.model.language == ""
    assert second.model.base == str(tmp_path / "stage-1" / "final")
    assert second.model.trainable == "lora"


def test_a_composed_model_with_auto_trains_in_two_stages_by_default(tmp_path):
    from umbrella_core.train.recipes import STAGE_ONE_SHARE, default_stages, stage_configs

    config = load_config(
        None,
        ["model.language=/models/lm", f"trainer.output_dir={tmp_path}", "trainer.max_steps=60"],
    )
    first, second = stage_configs(default_stages(config))
    assert (first.model.trainable, second.model.trainable) == ("projector", "lora")
    assert first.trainer.max_steps == round(60 * STAGE_ONE_SHARE)
    assert first.trainer.max_steps + second.trainer.max_steps == 60
    assert second.model.base == str(tmp_path / "stage-1" / "final")
    # Epochs split alike where they decide the length.
    by_epochs = load_config(
        None, ["model.language=/models/lm", "trainer.max_steps=0", "trainer.epochs=4"]
    )
    epochs = [c.trainer.epochs for c in stage_configs(default_stages(by_epochs))]
    assert epochs == [4 * STAGE_ONE_SHARE, 4 * (1 - STAGE_ONE_SHARE)]


def test_the_learning_rate_left_to_choose_follows_what_the_run_starts_from(tmp_path):
    """3e-4 with a pretrained language model (1e-3 left a Gemma 3 image path unable to tell
    the dMRI hemispheres apart), 1e-3 for tiny's random weights; a stage keeps the run's."""
    from umbrella_core.config import (
        PRETRAINED_LEARNING_RATE,
        RANDOM_START_LEARNING_RATE,
        learning_rate,
    )
    from umbrella_core.train.arguments import training_arguments
    from umbrella_core.train.recipes import default_stages, stage_configs

    out = f"trainer.output_dir={tmp_path}"
    tiny = load_config(None, [out])
    composed = load_config(None, ["model.language=/models/lm", out])
    assert learning_rate(tiny) == (RANDOM_START_LEARNING_RATE, "auto: random weights")
    assert learning_rate(composed) == (
        PRETRAINED_LEARNING_RATE,
        "auto: a pretrained language model",
    )
    assert learning_rate(load_config(None, ["model.base=/models/llava"]))[0] == (
        PRETRAINED_LEARNING_RATE
    )
    given = load_config(None, ["model.language=/models/lm", "trainer.learning_rate=1e-3"])
    assert learning_rate(given) == (1e-3, "trainer.learning_rate")
    assert training_arguments(composed, tmp_path).learning_rate == PRETRAINED_LEARNING_RATE
    assert training_arguments(tiny, tmp_path).learning_rate == RANDOM_START_LEARNING_RATE
    # Each stage chooses as the run did (the header says "auto").
    stages = stage_configs(default_stages(composed))
    assert [learning_rate(c) for c in stages] == [learning_rate(composed)] * 2
    # A tiny model's second stage starts from a checkpoint: still the random start's rate.
    staged = load_config(None, [out, 'stages=[{"model.trainable": full}, {"trainer.seed": 1}]'])
    assert [learning_rate(c)[0] for c in stage_configs(staged)] == [RANDOM_START_LEARNING_RATE] * 2


@pytest.mark.parametrize(
    "settings",
    [
        [],  # the tiny model
        ["model.language=/models/lm", "model.trainable=projector"],  # a choice made
        ["model.language=/models/lm", 'stages=[{"model.trainable": lora}]'],  # a recipe given
    ],
)
def test_other_runs_keep_the_plan_they_were_given(settings):
    from umbrella_core.train.recipes import default_stages

    config = load_config(None, settings)
    assert default_stages(config) is config


def test_two_stages_need_two_steps():
    from umbrella_core.train.recipes import default_stages

    with pytest.raises(ConfigError, match="at least 2 steps"):
        default_stages(load_config(None, ["model.language=/models/lm", "trainer.max_steps=1"]))
