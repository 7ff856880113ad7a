"""``umbrella export``: a folder to hand on, whose language model needs no UMBRELLA.

Checkpoints are built, not trained (build_model + save_checkpoint, LoRA
adapters given random values so that merging them matters), beside a run
folder's ``metrics.json`` and ``split.tsv`` as ``umbrella train`` leaves them:
the built-in ``tiny`` model with and without LoRA, and models composed from
tiny Gemma 3 and Llama 3 look-alikes saved as a user's folders.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from umbrella_core.commands import main
from umbrella_core.config import load_config
from umbrella_core.data.split_table import SplitRow, SplitTable
from umbrella_core.errors import ConfigError, ModelError
from umbrella_core.export.folder import export_checkpoint
from umbrella_core.export.model_card import render_card
from umbrella_core.model.build import build_model, load_base, load_checkpoint, save_checkpoint
from umbrella_core.testing import ToyModalityPlugin, fresh_plugin_manager, toy_modality

PROVENANCE = {"t1": ("t1", "umbrella-t1", "0.1.1"), "dmri": ("dmri", "umbrella-dmri", "0.2.0")}
QUESTION = "Which hemisphere holds the lesion?"
HELD_OUT = {
    "t1": {
        "n": 4,
        "loss": 0.5123,
        "questions": {
            QUESTION: {
                "family": "categorical",
                "n": 4,
                "metrics": {
                    "accuracy": 0.75,
                    "balanced_accuracy": 0.625,
                    "macro_f1": 0.7333,
                    "auroc": 0.8125,
                    "reference": {
                        "majority_class": "left",
                        "majority_accuracy": 0.5,
                        "chance": 0.5,
                    },
                },
            }
        },
    },
    "dmri": {"n": 2, "loss": 0.9876, "questions": {}},
}
LORA = {"r": 4, "alpha": 8.0, "dropout": 0.0}
CASES = ("tiny", "tiny-lora", "gemma3-lora", "llama-lora")


def _specs():
    return {name: toy_modality(name) for name in ("t1", "dmri")}


def _pm():
    return fresh_plugin_manager(ToyModalityPlugin(*_specs().values()))


def _randomise_adapters(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B" in name:
                p.normal_(0.0, 0.5)


def _run_folder(root: Path, case: str) -> Path:
    """``root/run/final``: a checkpoint of ``case`` with what a run records beside it."""
    from tiny_models.families import save_tiny_language_model
    from umbrella_core.model.compose import compose

    family = case.removesuffix("-lora")
    overrides = ["data.modalities=[t1, dmri]", "trainer.max_steps=12", "trainer.batch_size=4"]
    if family == "tiny":
        llava, tokenizer, _ = load_base("tiny")
    else:
        lm = save_tiny_language_model(
            family, root / "lm", vocab_size=2048, hidden_size=32, intermediate_size=64
        )
        llava, tokenizer = compose(str(lm), vision_hidden_size=32, vision_layers=1)
        overrides.append(f"model.language={lm}")
    model = build_model(llava, _specs(), _pm().patch_embedder)
    trainable = "full"
    if case.endswith("-lora"):
        model.add_lora(**LORA)
        _randomise_adapters(model)
        trainable = "lora"
    run = root / "run"
    metrics = {"train_loss": 1.2345, "steps": 12, "final": {"weights": "last", "step": 12}}
    config = load_config(None, overrides)
    save_checkpoint(
        model,
        tokenizer,
        run / "final",
        provenance=PROVENANCE,
        extra={
            "config": config.to_dict(),
            "studies": [],
            "trainable": trainable,
            "base_model": config.model.base,
        },
    )
    # As umbrella train leaves them: metrics.json with the held-out table, split.tsv.
    held = {**metrics, "held_out": HELD_OUT, "held_out_split": "test"}
    (run / "metrics.json").write_text(json.dumps(held))
    sides = ["train"] * 8 + ["validation", "test", "test"]
    rows = [
        SplitRow(study="demo", subject=f"sub-{i:02d}", split=side, made=True)
        for i, side in enumerate(sides)
    ]
    SplitTable(rows=rows, by="subject", seed=0).write(run / "split.tsv")
    return run / "final"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Per case: ``(checkpoint, export folder, merged)``."""
    out = {}
    for case in CASES:
        root = tmp_path_factory.mktemp(case)
        source = _run_folder(root, case)
        folder, merged = export_checkpoint(source, root / "export", _pm())
        out[case] = (source, folder, merged)
    return out


def _text_ids(tokenizer):
    return tokenizer("The lesion is in the left hemisphere.", return_tensors="pt")["input_ids"]


def _umbrella_logits(checkpoint, ids):
    """The UMBRELLA model's language-model logits on text alone (adapters unmerged)."""
    model, _, _ = load_checkpoint(checkpoint, _pm())
    with torch.no_grad():
        return model.eval()(input_ids=ids, return_logits=True).logits


# A user's machine: transformers only. Loads each folder, writes its logits on
# the ids given, and what it imported.
PLAIN = textwrap.dedent(
    """
    import json, sys
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    jobs = json.loads(sys.argv[1])
    report = {}
    for name, job in jobs.items():
        model = AutoModelForCausalLM.from_pretrained(job["folder"])
        tokenizer = AutoTokenizer.from_pretrained(job["folder"])
        ids = torch.tensor([job["ids"]])
        with torch.no_grad():
            logits = model.eval()(input_ids=ids).logits
        save_file({"logits": logits.contiguous()}, job["out"])
        chat = tokenizer.apply_chat_template(
            [{"role": "user", "content": "Which side?"}], add_generation_prompt=True,
            tokenize=False,
        )
        generated = model.generate(ids, max_new_tokens=3, do_sample=False)
        report[name] = {
            "ids": tokenizer(job["text"])["input_ids"],
            "chat": chat,
            "generated": generated.shape[1] - ids.shape[1],
            "class": type(model).__name__,
        }
    report["modules"] = sorted(
        m for m in sys.modules if m.split(".")[0] in ("umbrella_core", "peft")
    )
    print(json.dumps(report))
    """
)


@pytest.fixture(scope="module")
def plain_load(exported, tmp_path_factory):
    """What plain transformers, in a process that never imports UMBRELLA, makes of each export."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("plain")
    text = "The lesion is in the left hemisphere."
    jobs = {}
    for case, (_, folder, _) in exported.items():
        tokenizer = AutoTokenizer.from_pretrained(folder / "language")
        jobs[case] = {
            "folder": str(folder / "language"),
            "ids": _text_ids(tokenizer)[0].tolist(),
            "text": text,
            "out": str(root / f"{case}.safetensors"),
        }
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", PLAIN, json.dumps(jobs)],
        capture_output=True,
        text=True,
        env=env,
        cwd=root,  # not the source tree: nothing of umbrella_core on the path by accident
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    return report, jobs


def test_the_language_model_loads_with_transformers_alone(plain_load):
    report, _ = plain_load
    assert report["modules"] == []  # neither umbrella_core nor peft was imported
    assert report["tiny"]["class"] == "LlamaForCausalLM"
    assert report["gemma3-lora"]["class"] == "Gemma3ForCausalLM"
    for case in CASES:
        assert report[case]["generated"] == 3
        # The chat template travels in the tokenizer: Gemma's own, llava-1.5 for tiny.
        assert "Which side?" in report[case]["chat"]
    assert "<start_of_turn>" in report["gemma3-lora"]["chat"]


@pytest.mark.parametrize("case", CASES)
def test_exported_logits_equal_the_umbrella_models(case, exported, plain_load):
    source, folder, merged = exported[case]
    report, jobs = plain_load
    assert merged == case.endswith("-lora")
    ids = torch.tensor([jobs[case]["ids"]])
    # The exported tokenizer is the checkpoint's: the same ids for the same text.
    from transformers import AutoTokenizer

    assert (
        report[case]["ids"]
        == AutoTokenizer.from_pretrained(source)(jobs[case]["text"])["input_ids"]
    )
    plain = load_file(jobs[case]["out"])["logits"]
    torch.testing.assert_close(plain, _umbrella_logits(source, ids), rtol=1e-4, atol=1e-4)
    keys = load_file(folder / "language" / "model.safetensors")
    assert not [k for k in keys if "lora" in k or "base_layer" in k]


def test_tied_embeddings_stay_tied_and_untied_ones_untied(exported):
    from transformers import AutoModelForCausalLM

    for case, tied in (("gemma3-lora", True), ("llama-lora", False), ("tiny", False)):
        lm = AutoModelForCausalLM.from_pretrained(exported[case][1] / "language")
        assert (lm.get_output_embeddings().weight is lm.get_input_embeddings().weight) == tied
        assert lm.config.tie_word_embeddings == tied


def test_generation_stops_where_umbrella_stops(exported):
    from transformers import AutoTokenizer

    folder = exported["gemma3-lora"][1] / "language"
    generation = json.loads((folder / "generation_config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    # Gemma 3 ends a turn with <end_of_turn>, not only its eos.
    assert generation["eos_token_id"] == [
        tokenizer.eos_token_id,
        tokenizer.convert_tokens_to_ids("<end_of_turn>"),
    ]
    assert generation["pad_token_id"] == tokenizer.pad_token_id


@pytest.mark.parametrize("case", ["tiny-lora", "gemma3-lora"])
def test_vision_safetensors_holds_each_part_and_describes_it(case, exported):
    source, folder, _ = exported[case]
    model, _, _ = load_checkpoint(source, _pm())
    tensors = load_file(folder / "vision.safetensors")
    parts = {key.split(".")[0] for key in tensors}
    assert parts == {"embedders", "vision", "projector"}
    assert {key.split(".")[1] for key in tensors if key.startswith("embedders.")} == {
        "t1",
        "dmri",
    }
    # Nothing of the language model, and each tensor is the model's own.
    assert not [k for k in tensors if "language_model" in k or "lm_head" in k]
    embedder = dict(model.embeddings.embedders["t1"].named_parameters())
    for name, value in embedder.items():
        assert torch.equal(tensors[f"embedders.t1.{name}"], value.detach())
    projector = dict(model.llava.model.multi_modal_projector.named_parameters())
    for name, value in projector.items():
        assert torch.equal(tensors[f"projector.{name}"], value.detach())
    with safe_open(str(folder / "vision.safetensors"), "pt") as f:
        described = json.loads(f.metadata()["umbrella"])
    assert described["image_token_id"] == model.image_token_id
    assert described["vision_hidden_size"] == model.vision_hidden_size
    assert described["text_hidden_size"] == model.config.get_text_config().hidden_size
    spec = model.specs["t1"]
    assert described["modalities"]["t1"] == {
        "input_shape": [1, 8, 8, 8],
        "shape": [8, 8, 8],
        "patch_size": [4, 4, 4],
        "channels": 1,
        "num_tokens": spec.num_tokens,
    }


@pytest.mark.parametrize("case", ["tiny-lora", "gemma3-lora"])
def test_umbrella_loads_the_export_and_answers_as_the_checkpoint(case, exported):
    source, folder, _ = exported[case]
    pm = _pm()
    original, _, _ = load_checkpoint(source, pm)
    again, tokenizer, meta = load_checkpoint(folder, pm)
    assert meta["format"] == "umbrella-export" and meta["lora"] is None
    assert meta["exported_from"] == {"checkpoint": str(source), "merged_lora": True}
    assert meta["config"]["trainer"]["max_steps"] == 12  # the run's settings travel on
    assert not [n for n, _ in again.named_parameters() if "lora_" in n]
    spec = again.specs["t1"]
    ids = torch.tensor(
        [[again.image_token_id] * spec.num_tokens + _text_ids(tokenizer)[0].tolist()]
    )
    batch = {
        "input_ids": ids,
        "pixel_values": {"t1": torch.randn((1, *spec.input_shape), generator=torch.Generator())},
        "image_modalities": ["t1"],
        "return_logits": True,
    }
    with torch.no_grad():
        want = original.eval()(**batch).logits
        got = again.eval()(**batch).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_the_card_says_what_the_model_is_and_how_to_load_it(exported):
    source, folder, _ = exported["tiny-lora"]
    card = (folder / "README.md").read_text()
    front, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    assert "library_name: transformers" in front
    for tag in ("medical-imaging", "brain-mri", "vision-language", "umbrella"):
        assert f"- {tag}\n" in front
    assert "license: other" in front and "base_model" not in front  # tiny is no hub model
    # The held-out table of metrics.json, formatted as umbrella evaluate prints it.
    assert f"| t1 | {QUESTION} | 4 | accuracy | 75.0% | majority (left) 50.0% |" in body
    assert "| balanced accuracy | 62.5% |" in body and "| AUROC | 0.812 |" in body
    assert "| t1 | (all questions) | 4 | loss | 0.5123 |" in body
    assert "| dmri | (all questions) | 2 | loss | 0.9876 |" in body
    assert "the run's table of its test records" in body
    # The data: the demo, both modalities, subjects per split from split.tsv.
    assert "built-in synthetic demo" in body
    assert "| t1 | 1x8x8x8 | 4x4x4 | 8 |" in body
    assert "| demo | 8 | 1 | 2 |" in body
    # Training: steps, learning rate, trained parts, LoRA merged.
    assert "- Steps: 12 (batch size 4)" in body and "- Learning rate: 0.001" in body
    assert "- Trained parts: `lora`" in body
    assert "LoRA adapters (r=4, alpha=8.0" in body and "**merged** into `language/`" in body
    # How to load it, both ways; the plugins and versions of each modality.
    assert 'AutoModelForCausalLM.from_pretrained("export/language")' in body
    assert "umbrella generate --checkpoint export --modality t1" in body
    assert "pip install umbrella-core umbrella-dmri==0.2.0 umbrella-t1==0.1.1" in body
    assert "| dmri | dmri | umbrella-dmri | 0.2.0 |" in body


def test_the_card_of_an_unevaluated_checkpoint_says_so_and_names_a_hub_base_model(tmp_path):
    pm = _pm()
    llava, tokenizer, _ = load_base("tiny")
    model = build_model(llava, _specs(), pm.patch_embedder)
    source = save_checkpoint(model, tokenizer, tmp_path / "ckpt", provenance=PROVENANCE)
    folder, merged = export_checkpoint(source, tmp_path / "out", pm)
    assert not merged
    card = (folder / "README.md").read_text()
    assert "Not evaluated" in card and "not recorded in the checkpoint" in card.lower()
    # What umbrella evaluate wrote into the checkpoint is the table then.
    (source / "evaluation-test").mkdir()
    (source / "evaluation-test" / "metrics.json").write_text(json.dumps(HELD_OUT))
    export_checkpoint(source, tmp_path / "out", pm, overwrite=True)
    card = (folder / "README.md").read_text()
    assert "| 75.0% |" in card and "umbrella evaluate on the test split" in card
    # A run composed from a hub model names it as the card's base_model.
    meta = json.loads((folder / "umbrella.json").read_text())
    settings = ["model.language=google/gemma-3-1b-it", "data.studies=[ukb:/data/ukb]"]
    meta["config"] = load_config(None, settings).to_dict()
    card = render_card(meta, name="out")
    assert "base_model: google/gemma-3-1b-it\n" in card.split("---\n")[1]
    assert "- `ukb:/data/ukb`" in card and "synthetic demo" not in card
    assert "- Language model: `google/gemma-3-1b-it`" in card


def test_an_export_exports_again_with_what_it_knew(exported, tmp_path):
    _, folder, _ = exported["tiny-lora"]
    again, merged = export_checkpoint(folder, tmp_path / "again", _pm())
    assert not merged  # already merged
    meta = json.loads((again / "umbrella.json").read_text())
    assert meta["lora_merged"]["r"] == 4
    card = (again / "README.md").read_text()
    assert "| 75.0% |" in card and "| demo | 8 | 1 | 2 |" in card and "**merged**" in card


# -- refusals and atomic writes ------------------------------------------------


@pytest.fixture
def checkpoint(tmp_path):
    pm = _pm()
    llava, tokenizer, _ = load_base("tiny")
    model = build_model(llava, _specs(), pm.patch_embedder)
    return save_checkpoint(model, tokenizer, tmp_path / "run" / "final", provenance=PROVENANCE)


def test_export_refuses_to_write_over_the_checkpoint_or_a_full_folder(checkpoint, tmp_path):
    pm = _pm()
    for target in (checkpoint, checkpoint.parent):  # the checkpoint, or the folder holding it
        with pytest.raises(ModelError, match="not over the checkpoint itself"):
            export_checkpoint(checkpoint, target, pm, overwrite=True)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=f"{busy}: the folder is not empty.*--overwrite"):
        export_checkpoint(checkpoint, busy, pm)
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="is not a folder"):
        export_checkpoint(checkpoint, tmp_path / "file", pm)
    (tmp_path / "empty").mkdir()
    export_checkpoint(checkpoint, tmp_path / "empty", pm)  # an empty folder is fine
    # --overwrite replaces an earlier export, never a folder of the user's own files.
    with pytest.raises(ConfigError, match=r"holds files that are not an umbrella export \(notes"):
        export_checkpoint(checkpoint, busy, pm, overwrite=True)
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]
    export_checkpoint(checkpoint, tmp_path / "empty", pm, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == [
        "README.md",
        "language",
        "umbrella.json",
        "vision.safetensors",
    ]


def test_a_failed_export_leaves_nothing_half_written(checkpoint, tmp_path, monkeypatch):
    import umbrella_core.export.folder as export

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    kept = tmp_path / "kept"
    export_checkpoint(checkpoint, kept, _pm())
    earlier = {p.name: p.stat().st_mtime_ns for p in kept.iterdir()}
    monkeypatch.setattr(export, "render_card", broken)
    with pytest.raises(OSError):
        export_checkpoint(checkpoint, tmp_path / "new", _pm())
    assert not (tmp_path / "new").exists()
    with pytest.raises(OSError):
        export_checkpoint(checkpoint, kept, _pm(), overwrite=True)
    assert {p.name: p.stat().st_mtime_ns for p in kept.iterdir()} == earlier  # kept whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept", "run"]  # no scratch folders


# -- the command ---------------------------------------------------------------


def test_umbrella_export_and_generate_from_the_folder(tmp_path, capsys):
    """The installed t1 plugin, a NIfTI file: the export answers as the checkpoint does."""
    from umbrella_core.imaging import save_nifti
    from umbrella_core.plugins import get_plugin_manager

    pm = get_plugin_manager()
    spec = pm.resolve_modality("t1").item.with_geometry([16, 16, 16], [8, 8, 8])
    llava, tokenizer, _ = load_base("tiny")
    model = build_model(llava, {"t1": spec}, pm.patch_embedder)
    model.add_lora(**LORA)
    _randomise_adapters(model)
    source = save_checkpoint(model, tokenizer, tmp_path / "final", provenance={})
    image = tmp_path / "sub-01_T1w.nii.gz"
    volume = np.random.default_rng(0).random((20, 20, 20)).astype(np.float32)
    save_nifti(image, volume, np.eye(4))
    out = tmp_path / "handoff"
    assert main(["export", str(source), str(out), "--merge-lora"]) == 0
    said = capsys.readouterr().out
    assert f"to {out}" in said and "LoRA merged" in said and "README.md" in said
    answers = []
    for checkpoint in (source, out):
        args = ["generate", "--checkpoint", str(checkpoint), "--image", str(image)]
        assert main([*args, "--prompt", "Which side?", "--max-new-tokens", "8"]) == 0
        answers.append(capsys.readouterr().out)
    assert answers[0] == answers[1]
    # A second export into the same folder is refused in one line, then allowed.
    assert main(["export", str(source), str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(out) in err and "--overwrite" in err
    assert main(["export", str(source), str(out), "--overwrite"]) == 0
    assert main(["export", str(source), str(source)]) == 2
    assert "not over the checkpoint itself" in capsys.readouterr().err


def _t1_export(root: Path):
    """``(checkpoint, export)`` of the tiny model on the installed t1 plugin at 16^3, LoRA
    adapters merged into the export."""
    from umbrella_core.plugins import get_plugin_manager

    pm = get_plugin_manager()
    spec = pm.resolve_modality("t1").item.with_geometry([16, 16, 16], [8, 8, 8])
    llava, tokenizer, _ = load_base("tiny")
    model = build_model(llava, {"t1": spec}, pm.patch_embedder)
    model.add_lora(**LORA)
    _randomise_adapters(model)
    source = save_checkpoint(model, tokenizer, root / "final", provenance={})
    out, merged = export_checkpoint(source, root / "handoff", pm)
    assert merged
    return source, out


def test_the_tokenizer_of_an_exported_folder_is_read_from_language(tmp_path):
    from umbrella_core.model.start import load_tokenizer

    source, out = _t1_export(tmp_path)
    assert not (out / "tokenizer_config.json").exists()  # it is in language/
    exported, image_id = load_tokenizer(str(out))
    checkpoint, checkpoint_image_id = load_tokenizer(str(source))
    assert exported.get_vocab() == checkpoint.get_vocab()
    assert (
        image_id
        == checkpoint_image_id
        == json.loads((out / "umbrella.json").read_text())["vision_metadata"]["image_token_id"]
    )


@pytest.mark.slow
def test_umbrella_train_starts_from_an_exported_folder(tmp_path, monkeypatch):
    """``umbrella train --model EXPORT`` trains, and its first loss is the checkpoint's
    (the export holds its LoRA adapters merged: equal up to rounding)."""
    from umbrella_core.plugins import get_plugin_manager

    monkeypatch.setenv("UMBRELLA_CACHE", str(tmp_path / "cache"))
    pm = get_plugin_manager()
    source, out = _t1_export(tmp_path)
    losses = {}
    for name, base in (("from-checkpoint", source), ("from-export", out)):
        run = tmp_path / name
        args = ["train", "--model", str(base), "--modalities", "t1", "--output-dir", str(run)]
        args += ["--max-steps", "1", "--batch-size", "2", "--demo-subjects", "4", "--no-progress"]
        for setting in (
            "data.geometry={t1: {shape: [16, 16, 16], patch_size: [8, 8, 8]}}",
            "trainer.eval_strategy=no",
            "trainer.report_to=none",
        ):
            args += ["--set", setting]
        assert main(args) == 0, name
        losses[name] = json.loads((run / "metrics.json").read_text())["train_loss"]
        again, _, meta = load_checkpoint(run / "final", pm)
        assert meta["format"] == "umbrella-checkpoint" and set(again.specs) == {"t1"}
    assert losses["from-export"] == pytest.approx(losses["from-checkpoint"], rel=1e-4)


def _truncate(path):
    path.write_bytes(path.read_bytes()[:999])


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda c: _truncate(c / "model.safetensors"),
         r"model\.safetensors: cannot be read .*truncated or damaged; copy the checkpoint again"),
        (lambda c: (c / "umbrella.json").write_text('{"format": '),
         r"umbrella\.json: cannot be read as JSON .*the checkpoint is damaged"),
        (lambda c: (c / "umbrella.json").write_bytes(b"\xff\xfe\x00"),
         r"umbrella\.json: cannot be read as JSON"),
        (lambda c: (c / "umbrella.json").write_text("[1, 2]"),
         r"umbrella\.json: expected a JSON object, got list"),
    ],
)  # fmt: skip
def test_a_damaged_checkpoint_is_one_error_naming_its_file(checkpoint, tmp_path, damage, message):
    damage(checkpoint)
    with pytest.raises(ModelError, match=message):
        export_checkpoint(checkpoint, tmp_path / "out", _pm())
    assert not (tmp_path / "out").exists()
