"""Training recipes: trainable sets, LoRA, stages, checkpoints, bf16 and gradient checkpointing."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from umbrella_core.config import load_config
from umbrella_core.data.collate import UmbrellaCollator
from umbrella_core.data.conversation import encode_conversation
from umbrella_core.errors import ConfigError, ModelError
from umbrella_core.model.build import (
    build_model,
    load_base,
    load_checkpoint,
    save_checkpoint,
)
from umbrella_core.model.start import start_model
from umbrella_core.testing import ToyModalityPlugin, fresh_plugin_manager
from umbrella_core.types import Turn

PROVENANCE = {"t1": ("p", "umbrella-t1", "0.1"), "dmri": ("p", "umbrella-dmri", "0.2")}


@pytest.fixture
def toy_model(toy_pm):
    specs = {name: toy_pm.resolve_modality(name).item for name in ("dmri", "t1")}
    llava, tokenizer, _ = load_base("tiny")
    return build_model(llava, specs, toy_pm.patch_embedder), tokenizer


def _batch(model, tokenizer, n=2, modality="t1", seed=0):
    generator = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        enc = encode_conversation(
            [
                Turn(role="user", content="<image>\nWhich side?"),
                Turn(role="assistant", content="left" if i % 2 else "right"),
            ],
            [modality],
            tokenizer=tokenizer,
            image_token_id=model.image_token_id,
            tokens_per_modality={k: s.num_tokens for k, s in model.specs.items()},
            max_length=512,
        )
        image = torch.randn(1, 8, 8, 8, generator=generator)
        items.append(
            {
                "input_ids": enc.input_ids,
                "labels": enc.labels,
                "images": [(modality, image)],
                "key": modality,
            }
        )
    return UmbrellaCollator(tokenizer.pad_token_id, model.modalities)(items)


def _language_weights(model):
    """The language model's own weights (LoRA's ``base_layer`` named as without LoRA)."""
    return {
        name.replace(".base_layer", ""): p.detach().clone()
        for name, p in model.language_model.named_parameters()
        if ".lora_" not in name
    }


# -- trainable sets -------------------------------------------------------------


@pytest.mark.parametrize("which", ["embedders", "projector", "lora", "full"])
def test_optimizer_holds_exactly_the_trainable_parameters(tmp_path, toy_model, which):
    from umbrella_core.data.interleave import Interleaving
    from umbrella_core.train.arguments import training_arguments
    from umbrella_core.train.trainer import UmbrellaTrainer

    model, tokenizer = toy_model
    if which == "lora":
        model.add_lora()
    model.set_trainable(which)
    config = load_config(
        None,
        [f"trainer.output_dir={tmp_path}", "trainer.progress=false", "trainer.eval_strategy='no'"],
    )
    trainer = UmbrellaTrainer(
        model=model,
        args=training_arguments(config, tmp_path),
        train_dataset=[],
        processing_class=tokenizer,
        interleaving=Interleaving([1], [1.0]),
        provenance=PROVENANCE,
        run_meta={},
    )
    optimizer = trainer.create_optimizer()
    in_optimizer = [id(p) for group in optimizer.param_groups for p in group["params"]]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert len(in_optimizer) == len(set(in_optimizer))
    assert set(in_optimizer) == trainable
    groups = model.parameter_groups()
    expected = {
        "embedders": {"embedders"},
        "projector": {"embedders", "projector"},
        "lora": {"embedders", "projector", "lora"},
        "full": {"embedders", "projector", "vision", "language", "lora"},
    }[which]
    assert trainable == {id(p) for g in expected for p in groups[g]}
    assert all(not p.requires_grad for p in groups["unused"])


def test_lora_is_added_to_the_language_model_only_and_starts_as_a_no_op(toy_model):
    model, tokenizer = toy_model
    batch = _batch(model, tokenizer)
    model.eval()
    before = model(**batch).logits
    model.add_lora(r=4, target_modules=("q_proj", "v_proj"))
    names = [n for n, _ in model.named_parameters() if ".lora_" in n]
    assert names and all(n.startswith("llava.model.language_model.") for n in names)
    assert {n.split(".")[-4] for n in names} == {"q_proj", "v_proj"}  # not the vision q_proj
    assert torch.equal(model(**batch).logits, before)
    with pytest.raises(ModelError, match="already has LoRA adapters"):
        model.add_lora(r=8)


def test_lora_needs_adapters_and_known_target_modules(toy_model):
    model, _ = toy_model
    with pytest.raises(ModelError, match="add_lora"):
        model.set_trainable("lora")
    with pytest.raises(ModelError, match="no layer named 'qkv'"):
        model.add_lora(target_modules=("q_proj", "qkv"))


def test_lora_training_changes_adapters_embedders_and_projector_never_the_language_model(
    toy_model,
):
    model, tokenizer = toy_model
    model.add_lora(dropout=0.0)
    model.set_trainable("lora")
    base = _language_weights(model)
    head = model.llava.lm_head.weight.detach().clone()
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" in n}
    projector = model.llava.model.multi_modal_projector.linear_1.weight.detach().clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(3):
        optimizer.zero_grad()
        model(**_batch(model, tokenizer, seed=step)).loss.backward()
        optimizer.step()
    for name, weight in _language_weights(model).items():
        assert torch.equal(weight, base[name]), name
    assert torch.equal(model.llava.lm_head.weight, head)
    changed = [
        n for n, p in model.named_parameters() if ".lora_" in n and not torch.equal(p, adapters[n])
    ]
    assert sorted(changed) == sorted(adapters)
    assert not torch.equal(model.llava.model.multi_modal_projector.linear_1.weight, projector)
    # Frozen parameters never get an optimizer state.
    frozen = {id(p) for p in model.parameters() if not p.requires_grad}
    assert not frozen & {id(p) for p in optimizer.state}


# -- checkpoints ----------------------------------------------------------------


def _randomise_adapters(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B" in name:
                p.normal_(0.0, 0.5)


def test_lora_checkpoint_reloads_with_identical_logits(tmp_path, toy_model, toy_pm):
    model, tokenizer = toy_model
    model.add_lora(r=4, alpha=8, dropout=0.1)
    _randomise_adapters(model)
    folder = save_checkpoint(model, tokenizer, tmp_path / "ckpt", provenance=PROVENANCE)
    meta = json.loads((folder / "umbrella.json").read_text())
    assert meta["lora"] == {
        "r": 4,
        "alpha": 8.0,
        "dropout": 0.1,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
    }
    assert {(m["name"], m["distribution"], m["version"]) for m in meta["modalities"]} == {
        ("t1", "umbrella-t1", "0.1"),
        ("dmri", "umbrella-dmri", "0.2"),
    }
    keys = load_file(folder / "model.safetensors")
    assert any(".q_proj.lora_A." in k for k in keys)
    assert any(".q_proj.base_layer.weight" in k for k in keys)
    loaded, _, _ = load_checkpoint(folder, toy_pm)
    assert loaded.lora_settings == model.lora_settings
    batch = _batch(model, tokenizer)
    model.eval()
    loaded.eval()
    assert torch.equal(loaded(**batch).logits, model(**batch).logits)


@pytest.mark.parametrize("lora", [False, True])
def test_checkpoint_refuses_to_load_without_a_needed_modality_plugin(
    tmp_path, toy_model, toy_pm, lora
):
    model, tokenizer = toy_model
    if lora:
        model.add_lora()
    save_checkpoint(model, tokenizer, tmp_path / "ckpt", provenance=PROVENANCE)
    only_t1 = fresh_plugin_manager(ToyModalityPlugin(toy_pm.resolve_modality("t1").item))
    with pytest.raises(ModelError) as error:
        load_checkpoint(tmp_path / "ckpt", only_t1)
    message = str(error.value)
    assert "modality 'dmri'" in message
    assert "pip install umbrella-dmri" in message
    assert "version 0.2" in message


def test_checkpoint_that_the_installed_embedder_does_not_fit_is_refused(
    tmp_path, toy_model, toy_specs
):
    import attrs

    model, tokenizer = toy_model
    save_checkpoint(model, tokenizer, tmp_path / "ckpt", provenance=PROVENANCE)
    two_channel = [attrs.evolve(s, channels=2) for s in toy_specs]
    changed = fresh_plugin_manager(ToyModalityPlugin(*two_channel))
    meta_file = tmp_path / "ckpt" / "umbrella.json"
    meta = json.loads(meta_file.read_text())
    for entry in meta["modalities"]:
        entry["channels"] = 2
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="do not fit .*umbrella-t1 0.1"):
        load_checkpoint(tmp_path / "ckpt", changed)


def test_a_run_starts_from_an_umbrella_checkpoint_with_the_same_modalities(
    tmp_path, toy_model, toy_pm
):
    model, tokenizer = toy_model
    model.add_lora()
    _randomise_adapters(model)
    save_checkpoint(model, tokenizer, tmp_path / "ckpt", provenance=PROVENANCE)
    config = load_config(None, [f"model.base={tmp_path / 'ckpt'}", "model.trainable=lora"])
    specs = dict(model.specs)
    begun = start_model(config.model, specs, toy_pm)
    started, is_random, trainable = begun.model, begun.base_is_random, begun.trainable
    assert (is_random, trainable) == (False, "lora")
    for (name, p), (_, q) in zip(
        model.state_dict().items(), started.state_dict().items(), strict=True
    ):
        assert torch.equal(p, q), name
    with pytest.raises(ModelError, match="this run has t1"):
        start_model(config.model, {"t1": specs["t1"]}, toy_pm)


# -- configuration and recipes --------------------------------------------------


def test_lora_settings_come_from_the_model_section():
    config = load_config(None, ["model.lora.r=4", "model.lora.target_modules=q_proj,v_proj"])
    assert config.model.lora.r == 4
    assert config.model.lora.target_modules == ("q_proj", "v_proj")
    assert config.model.lora.alpha == 16.0
    with pytest.raises(ConfigError, match="model.lora.dropout"):
        load_config(None, ["model.lora.dropout=1.5"])
    with pytest.raises(ConfigError, match="unknown setting model.lora.rank"):
        load_config(None, ["model.lora.rank=4"])


def test_stages_are_overrides_of_the_run_each_from_the_previous_checkpoint(tmp_path):
    from umbrella_core.train.recipes import stage_configs

    config = load_config(
        None,
        [
            f"trainer.output_dir={tmp_path}",
            "trainer.learning_rate=1e-3",
            'stages=[{"model.trainable": projector, "trainer.learning_rate": 5e-3},'
            ' {"model": {"trainable": lora, "lora": {"r": 4}}}]',
        ],
    )
    first, second = stage_configs(config)
    assert first.model.trainable == "projector" and first.trainer.learning_rate == 5e-3
    assert first.model.base == "tiny"
    assert first.trainer.output_dir == str(tmp_path / "stage-1")
    # Overrides do not carry over: stage 2 has the run's learning rate.
    assert second.model.trainable == "lora" and second.trainer.learning_rate == 1e-3
    assert second.model.lora.r == 4
    assert second.model.base == str(tmp_path / "stage-1" / "final")
    assert second.trainer.output_dir == str(tmp_path / "stage-2")
    assert first.stages == () and second.stages == ()


@pytest.mark.parametrize(
    "stages, message",
    [
        ('[{"trainer.output_dir": x}]', r"stages\[0\]: trainer.output_dir is set by the recipe"),
        ('[{}, {"model.base": tiny}]', r"stages\[1\]: model.base of a later stage"),
        ('[{}, {"model.trainable": most}]', r"stages\[1\]: model.trainable: expected one of"),
        ('[{}, {"trainer.max_step": 3}]', r"stages\[1\]: unknown setting trainer.max_step"),
    ],
)
def test_bad_stage_is_an_error_naming_the_stage(stages, message):
    from umbrella_core.train.recipes import stage_configs

    with pytest.raises(ConfigError, match=message):
        stage_configs(load_config(None, [f"stages={stages}"]))


def test_recipe_flag_runs_the_shipped_stages(monkeypatch, tmp_path):
    from umbrella_core.commands import build_parser, main
    from umbrella_core.train import recipes

    seen = {}
    # With stages the command line runs the recipe (which runs train() per stage).
    monkeypatch.setattr(
        recipes, "run_stages", lambda config, pm, **_: seen.setdefault("config", config)
    )
    monkeypatch.setattr("umbrella_core.plugins.get_plugin_manager", lambda: None)
    assert main(["train", "--recipe", "two-stage", "--output-dir", str(tmp_path)]) == 0
    assert seen["config"].stages == recipes.RECIPES["two-stage"]
    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    choices = next(a.choices for a in train._actions if a.dest == "recipe")
    assert sorted(choices) == sorted(recipes.RECIPES)


# -- bf16 and gradient checkpointing ------------------------------------------------


def test_gradient_checkpointing_recomputes_the_language_model_with_the_same_gradients(
    toy_model,
):
    model, tokenizer = toy_model
    model.set_trainable("full")
    model.train()
    batch = _batch(model, tokenizer, n=3)  # t1 only: dmri is absent (coverage path)
    calls = []
    mlp = model.language_model.layers[0].mlp
    forward = mlp.forward  # counted: module hooks do not run again in the recompute

    def counted(*args, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)

    mlp.forward = counted

    def gradients():
        model.zero_grad(set_to_none=True)
        calls.clear()
        model(**batch).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, len(
            calls
        )

    plain, plain_calls = gradients()
    model.activation_checkpointing_enable()
    checkpointed, checkpointed_calls = gradients()
    model.activation_checkpointing_disable()
    assert (plain_calls, checkpointed_calls) == (1, 2)  # the layer ran again in backward
    assert plain.keys() == checkpointed.keys()
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    for name, grad in checkpointed.items():
        if ".embedders.dmri." in name:
            assert torch.count_nonzero(grad) == 0, name  # absent: exactly zero, as without


@pytest.fixture(scope="module")
def demo_env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("UMBRELLA_CACHE", str(cache))
        yield


def _demo_config(out, *overrides):
    return load_config(
        None,
        [
            "data.modalities=t1",
            "data.demo_subjects=5",
            f"trainer.output_dir={out}",
            "trainer.batch_size=2",
            "trainer.progress=false",
            "trainer.logging_steps=1",
            "trainer.warmup_ratio=0",
            "trainer.eval_strategy='no'",
            *overrides,
        ],
    )


def test_bf16_with_gradient_checkpointing_trains_on_cpu_with_a_finite_loss(tmp_path, demo_env):
    from torch.utils.data import ConcatDataset

    from umbrella_core.data.interleave import Interleaving
    from umbrella_core.plugins import get_plugin_manager
    from umbrella_core.train.arguments import training_arguments
    from umbrella_core.train.run import prepare
    from umbrella_core.train.trainer import UmbrellaTrainer

    config = _demo_config(
        tmp_path,
        "trainer.max_steps=3",
        "trainer.bf16=true",
        "trainer.gradient_checkpointing=true",
        "model.trainable=lora",
    )
    prep = prepare(config, get_plugin_manager(), log=lambda _: None)
    args = training_arguments(config, tmp_path)
    trainer = UmbrellaTrainer(
        model=prep.model,
        args=args,
        train_dataset=ConcatDataset(prep.train_sets),
        data_collator=UmbrellaCollator(prep.tokenizer.pad_token_id, tuple(prep.specs)),
        processing_class=prep.tokenizer,
        interleaving=Interleaving([len(ds) for ds in prep.train_sets], prep.weights),
        provenance=prep.provenance,
        run_meta={},
    )
    adapters = {n: p.detach().clone() for n, p in prep.model.named_parameters() if "lora_B" in n}
    result = trainer.train()
    assert trainer.accelerator.mixed_precision == "bf16"
    assert all(layer.gradient_checkpointing for layer in prep.model.language_model.layers)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert math.isfinite(result.training_loss)
    assert any(
        not torch.equal(p, adapters[n]) for n, p in prep.model.named_parameters() if "lora_B" in n
    )


@pytest.mark.slow
def test_two_stage_recipe_runs_end_to_end_each_stage_from_the_previous(
    tmp_path, demo_env, monkeypatch
):
    from umbrella_core.plugins import get_plugin_manager
    from umbrella_core.train import run
    from umbrella_core.train.recipes import run_stages

    starts = []
    prepare = run.prepare

    def recording_prepare(config, pm, **kwargs):
        prep = prepare(config, pm, **kwargs)
        starts.append((prep.trainable, config.model.base, prep.model.state_dict()))
        starts[-1] = starts[-1][:2] + ({k: v.clone() for k, v in starts[-1][2].items()},)
        return prep

    monkeypatch.setattr(run, "prepare", recording_prepare)
    config = _demo_config(
        tmp_path,
        "trainer.max_steps=2",
        'stages=[{"model.trainable": projector}, {"model.trainable": lora}]',
    )
    metrics = run_stages(config, get_plugin_manager(), log=lambda _: None)

    assert [s["stage"] for s in metrics["stages"]] == [1, 2]
    assert json.loads((tmp_path / "stages.json").read_text())[1]["output_dir"] == str(
        tmp_path / "stage-2"
    )
    (trainable_1, base_1, _), (trainable_2, base_2, start_2) = starts
    assert (trainable_1, base_1) == ("projector", "tiny")
    assert (trainable_2, base_2) == ("lora", str(tmp_path / "stage-1" / "final"))
    final_1 = load_file(tmp_path / "stage-1" / "final" / "model.safetensors")
    final_2 = load_file(tmp_path / "stage-2" / "final" / "model.safetensors")
    embedders = [k for k in final_1 if ".embeddings.embedders." in k]
    assert embedders
    for key in final_1:
        # Stage 2 starts from every weight stage 1 ended with (LoRA renames the base layers).
        start_key = key if key in start_2 else key.replace(".weight", ".base_layer.weight")
        assert torch.equal(start_2[start_key], final_1[key]), key
    assert any(not torch.equal(final_2[k], final_1[k]) for k in embedders)
    assert any(".lora_B." in k for k in final_2)
    for key, value in final_1.items():
        if ".language_model." in key:
            stage_2_key = key if key in final_2 else key.replace(".weight", ".base_layer.weight")
            assert torch.equal(final_2[stage_2_key], value), key
    meta = json.loads((tmp_path / "stage-2" / "final" / "umbrella.json").read_text())
    assert meta["lora"]["r"] == 8
    assert meta["config"]["model"]["base"] == str(tmp_path / "stage-1" / "final")
    # Where a one-stage run keeps it: the last stage's final/.
    assert (tmp_path / "final").resolve() == (tmp_path / "stage-2" / "final").resolve()


@pytest.mark.slow
def test_umbrella_train_composes_in_two_stages_by_default(tmp_path, demo_env, capsys):
    """``umbrella train --language DIR`` with the defaults: LLaVA's two stages, printed first;
    the fresh vision body trains in both; generation then reads OUTPUT_DIR/final."""
    from tiny_models.families import save_tiny_language_model
    from umbrella_core.commands import main
    from umbrella_core.model.compose import compose

    folder = save_tiny_language_model(
        "gemma3", tmp_path / "lm", vocab_size=2048, hidden_size=32, intermediate_size=64
    )
    out = tmp_path / "run"
    argv = ["train", "--language", str(folder), "--modalities", "t1", "--output-dir", str(out)]
    argv += ["--max-steps", "4", "--batch-size", "2", "--demo-subjects", "5", "--no-progress"]
    # No warm-up: stage 1's one step would be taken at a learning rate of 0.
    argv += ["--set", "trainer.eval_strategy=no", "--set", "trainer.warmup_ratio=0"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "LLaVA's two stages" in printed
    assert "stage 1: model.trainable=projector, trainer.max_steps=1" in printed
    assert "stage 2: model.trainable=lora, trainer.max_steps=3" in printed
    # The header names the template the conversations are written with, and the stops.
    assert "chat         the tokenizer's own template (auto): turns end with <end_of_turn>" in (
        printed
    )
    assert "learning     rate 0.0003 (auto: a pretrained language model), cosine" in printed
    stages = json.loads((out / "stages.json").read_text())
    assert [s["steps"] for s in stages] == [1, 3]
    assert (out / "final").resolve() == (out / "stage-2" / "final").resolve()
    fresh, _ = compose(str(folder), vision_hidden_size=256)
    first = load_file(out / "stage-1" / "final" / "model.safetensors")
    second = load_file(out / "stage-2" / "final" / "model.safetensors")
    layers = [k for k in first if ".vision_tower." in k and ".encoder.layers." in k]
    assert layers
    initial = {f"llava.{k}": v for k, v in fresh.state_dict().items()}
    for key in layers:
        assert key in initial, key
    assert any(not torch.equal(first[k], initial[k]) for k in layers)  # stage 1 trained it
    assert any(not torch.equal(second[k], first[k]) for k in layers)  # and stage 2 too
    assert any(".lora_B." in k for k in second)


def test_with_resume_auto_a_finished_stage_is_not_run_again(tmp_path, toy_model, monkeypatch):
    from umbrella_core.train import recipes, run

    model, tokenizer = toy_model
    save_checkpoint(model, tokenizer, tmp_path / "stage-1" / "final", provenance=PROVENANCE)
    (tmp_path / "stage-1" / "metrics.json").write_text(json.dumps({"steps": 7}))
    trained = []
    monkeypatch.setattr(
        run, "train", lambda config, pm, log: trained.append(config) or {"steps": 3}
    )
    config = load_config(
        None,
        [
            f"trainer.output_dir={tmp_path}",
            "trainer.resume=auto",
            'stages=[{"model.trainable": projector}, {"model.trainable": lora}]',
        ],
    )
    metrics = recipes.run_stages(config, None, log=lambda _: None)
    assert [c.trainer.output_dir for c in trained] == [str(tmp_path / "stage-2")]
    assert [s["steps"] for s in metrics["stages"]] == [7, 3]
    assert metrics["steps"] == 3
