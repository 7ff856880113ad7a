"""Evaluation during training, generated samples, ``umbrella generate`` and ``umbrella evaluate``.

One short demo run (t1 and dmri at a small geometry, evaluated every epoch)
is shared by most tests; early stopping has its own, shorter run.
"""

from __future__ import annotations

import json
from pathlib import Path

import attrs
import nibabel as nib
import numpy as np
import pytest
import torch

from umbrella_core.commands import main
from umbrella_core.config import load_config
from umbrella_core.errors import ConfigError
from umbrella_core.inference.generate import load_for_inference
from umbrella_core.plugins import get_plugin_manager

SMALL = [
    "data.modalities=[t1, dmri]",
    "data.demo_subjects=11",  # 8 train, 1 validation, 2 test subjects per modality
    "data.geometry={t1: {shape: [16, 16, 16], patch_size: [8, 8, 8]}, "
    "dmri: {shape: [16, 16, 16], patch_size: [8, 8, 8]}}",
    "trainer.batch_size=4",
    "trainer.logging_steps=4",
    "trainer.progress=false",
]


def _train(out: Path, *overrides: str) -> tuple[dict, list[str]]:
    from umbrella_core.train.run import train

    lines: list[str] = []
    config = load_config(None, [*SMALL, f"trainer.output_dir={out}", *overrides])
    return train(config, get_plugin_manager(), log=lines.append), lines


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run evaluated every 4 steps (half an epoch), 12 steps in all."""
    out = tmp_path_factory.mktemp("evalrun")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("UMBRELLA_CACHE", str(out / "cache"))
        metrics, lines = _train(
            out / "run",
            "trainer.max_steps=12",
            "trainer.generate_samples=2",
            "trainer.eval_strategy=steps",
            "trainer.eval_steps=4",
        )
        yield out / "run", metrics, lines


def _events(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_each_evaluation_logs_loss_and_accuracy_per_modality_to_tensorboard(run):
    run_dir, metrics, _ = run
    acc = _events(run_dir)
    for tag in ("loss", "accuracy", "loss/t1", "loss/dmri", "accuracy/t1", "accuracy/dmri"):
        assert [e.step for e in acc.Scalars(f"eval/{tag}")] == [4, 8, 12], tag
    # Evaluations are of the validation records (one of each modality); the
    # printed table of the test records (two of each).
    overall = acc.Scalars("eval/loss")[-1].value
    assert overall == pytest.approx(
        np.mean([acc.Scalars(f"eval/loss/{k}")[-1].value for k in ("t1", "dmri")]), rel=1e-4
    )
    assert metrics["held_out_split"] == "test"
    # Two test subjects, each asked the hemisphere and the lesion's x coordinate.
    assert {r["n"] for r in metrics["held_out"].values()} == {4}
    # Each question's metrics and figure, at each evaluation and for the test table.
    side = "which_hemisphere_holds_the_lesion"
    for key in ("t1", "dmri"):
        steps = [e.step for e in acc.Scalars(f"eval/balanced_accuracy/{key}/{side}")]
        assert steps == [4, 8, 12]
        assert [e.step for e in acc.Scalars(f"test/balanced_accuracy/{key}/{side}")] == [12]
        for prefix in ("eval", "test"):
            assert f"{prefix}/{key}/{side}" in acc.Tags()["images"]
            assert f"{prefix}/{key}/what_is_the_ras_x_coordinate_of_the" in acc.Tags()["images"]


def test_best_checkpoint_is_the_lowest_eval_loss_and_loads(run):
    from safetensors.numpy import load_file

    from umbrella_core.model.build import load_checkpoint

    run_dir, metrics, lines = run
    losses = {e.step: e.value for e in _events(run_dir).Scalars("eval/loss")}
    best = metrics["best"]
    assert best["metric"] == "eval_loss"
    assert best["step"] == min(losses, key=losses.get)
    assert best["value"] == pytest.approx(losses[best["step"]], rel=1e-5)
    assert json.loads((run_dir / "metrics.json").read_text())["best"] == best
    model, _, meta = load_checkpoint(run_dir / "best", get_plugin_manager())
    assert meta["best"]["step"] == best["step"]
    assert not list((run_dir / "best").glob("*.bin")) and not list((run_dir / "best").glob("*.pt"))
    # trainer.load_best_at_end: final/ holds the best weights too.
    a = load_file(str(run_dir / "best" / "model.safetensors"))
    b = load_file(str(run_dir / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert any(line.startswith("best checkpoint:") for line in lines)


def test_generated_samples_with_their_slices_are_in_tensorboard(run):
    run_dir, _, _ = run
    acc = _events(run_dir)
    texts = sorted(t for t in acc.Tags()["tensors"] if t.startswith("samples/"))
    assert texts == [f"samples/{i}/text_summary" for i in range(2)]  # the validation records
    shown = [acc.Tensors(t)[-1].tensor_proto.string_val[0].decode() for t in texts]
    # Taken in turn from each modality, with prompt, reference and generated answer.
    assert [s.split("**sample** | ")[1].split(" ")[0] for s in shown] == ["dmri", "t1"]
    for text in shown:
        assert "&lt;image&gt;" in text and "Which hemisphere" in text
        assert "**reference** | left" in text or "**reference** | right" in text
        assert "**generated** |" in text
    assert [e.step for e in acc.Tensors("samples/0/text_summary")] == [4, 8, 12]
    image = acc.Images("samples/0/images")[-1]
    assert image.step == 12 and image.height >= 128 and image.width > 2 * image.height


def test_greedy_generation_agrees_with_teacher_forced_accuracy(run):
    from umbrella_core.constants import IGNORE_INDEX
    from umbrella_core.data.collate import UmbrellaCollator
    from umbrella_core.data.conversation import Tokenization
    from umbrella_core.data.dataset import RecordDataset
    from umbrella_core.data.studies import read_studies
    from umbrella_core.inference.generate import greedy_generate, load_for_inference, record_prompt

    run_dir, metrics, _ = run
    pm = get_plugin_manager()
    loaded = load_for_inference(run_dir / "final", pm, device="cpu")
    data = read_studies(loaded.config, pm, log=lambda _: None)
    model, tokenizer = loaded.model, loaded.tokenizer
    held_out = RecordDataset(
        [r for r in data.records if r.split == "test"],
        loaded.specs,
        Tokenization.of(tokenizer, model.image_token_id, loaded.specs, 1024),
    )
    collator = UmbrellaCollator(tokenizer.pad_token_id, tuple(model.specs))
    correct = 0
    for i in range(len(held_out)):
        item = held_out[i]
        batch = collator([item])
        with torch.no_grad():
            logits = model(**batch).logits[0, :-1]
        target = batch["labels"][0, 1:]
        answer = (target != IGNORE_INDEX).nonzero().flatten()
        teacher = logits.argmax(-1)[answer]
        prompt, images = record_prompt(held_out, i)
        assert prompt == item["input_ids"][: int(answer[0]) + 1]
        generated = greedy_generate(
            model, prompt, images, max_new_tokens=12, eos_token_id=tokenizer.eos_token_id
        )
        assert generated[0] == int(teacher[0])
        exact = bool((teacher == target[answer]).all())
        assert (generated == target[answer].tolist()) == exact
        correct += exact
        # The KV cache changes nothing: the same tokens as full forwards, one at a time.
        ids = list(prompt)
        for token in generated:
            with torch.no_grad():
                out = model(
                    input_ids=torch.tensor([ids]),
                    pixel_values={m: t[None] for m, t in images},
                    image_modalities=[m for m, _ in images],
                )
            assert int(out.logits[0, -1].argmax()) == token
            ids.append(token)
    # "exact": the greedy answer is the reference, token for token (teacher-forced).
    assert correct == round(sum(r["exact"] * r["n"] for r in metrics["held_out"].values()))


def test_umbrella_generate_answers_about_a_demo_file(run, capsys):
    from umbrella_core.data.studies import read_studies

    run_dir, _, _ = run
    config = load_config(None, SMALL)
    record = next(
        r
        for r in read_studies(config, get_plugin_manager(), log=lambda _: None).records
        if r.modalities == ("t1",) and r.split == "test"
    )
    (path,) = record.images[0].paths
    assert path.endswith("_T1w.nii.gz")  # the modality is guessed from the name
    prompt = "Which hemisphere holds the lesion?"
    assert main(["generate", "--checkpoint", str(run_dir / "final"), "--image", path,
                 "--prompt", prompt]) == 0  # fmt: skip
    answer = capsys.readouterr().out.strip()
    assert answer in ("left", "right")
    # The same as the held-out sample's prompt (which has the <image> line first).
    assert main(["generate", "--checkpoint", str(run_dir / "final"), "--image", path,
                 "--modality", "T1w", "--prompt", f"<image>\n{prompt}"]) == 0  # fmt: skip
    assert capsys.readouterr().out.strip() == answer
    # What the model is given: the rendered prompt, and the image as it reads it.
    seen = run_dir.parent / "seen"
    assert main(["generate", "--checkpoint", str(run_dir / "final"), "--image", path,
                 "--prompt", prompt, "--show-prompt", "--save-input", str(seen)]) == 0  # fmt: skip
    out, err = capsys.readouterr()
    assert out.strip() == answer
    spec = load_for_inference(run_dir / "final", get_plugin_manager()).specs["t1"]
    assert f"<image x {spec.num_tokens}>" in err and prompt in err and "prompt (" in err
    (written,) = seen.iterdir()
    assert written.name == "input-1-t1.nii.gz" and f"model input: {written}" in err
    image = nib.load(written).get_fdata()
    assert image.shape == spec.shape
    expected = spec.load(spec, (path,))[0]
    assert np.allclose(image, expected, atol=1e-5)


def test_umbrella_export_writes_a_model_that_answers_the_same(run, tmp_path, capsys):
    from umbrella_core.data.studies import read_studies

    run_dir, _, _ = run
    exported = tmp_path / "exported"
    assert main(["export", str(run_dir / "final"), str(exported), "--merge-lora"]) == 0
    said = capsys.readouterr().out
    assert "no LoRA adapters: nothing to merge" in said and f"to {exported}" in said
    assert not list(exported.glob("*.pt")) and not list(exported.glob("evaluation-*"))
    record = next(
        r
        for r in read_studies(load_config(None, SMALL), get_plugin_manager(), log=print).records
        if r.modalities == ("dmri",)
    )
    answers = []
    for checkpoint in (run_dir / "final", exported):
        args = ["generate", "--checkpoint", str(checkpoint), "--modality", "dmri"]
        args += ["--image", ",".join(record.images[0].paths), "--prompt", "Which hemisphere?"]
        capsys.readouterr()
        assert main(args) == 0
        answers.append(capsys.readouterr().out.strip())
    assert answers[0] == answers[1] and answers[0]
    assert main(["export", str(exported), str(exported)]) == 2
    assert "not over the checkpoint itself" in capsys.readouterr().err


def test_generate_and_cache_build_refuse_what_validate_and_train_refuse(run, tmp_path, capsys):
    from umbrella_core.imaging import save_nifti

    run_dir, _, _ = run
    # One file, four commands, one judgement (umbrella_core.data.checks.check_image).
    study = tmp_path / "study"
    study.mkdir()
    noise = np.random.default_rng(0).random((8, 8, 8)).astype(np.float32)
    save_nifti(study / "wide_T1w.nii.gz", noise, np.diag([53.0, 53.0, 53.0, 1.0]))
    turns = [{"role": "user", "content": "<image>\nSide?"}]
    turns.append({"role": "assistant", "content": "left"})
    record = {"subject": "sub-w", "images": [{"modality": "t1", "path": "wide_T1w.nii.gz"}]}
    (study / "manifest.jsonl").write_text(json.dumps(record | {"conversation": turns}) + "\n")
    said = "wide_T1w.nii.gz: voxel size 53 x 53 x 53 mm is outside 0.05-20 mm"
    image = str(study / "wide_T1w.nii.gz")
    ask = ["generate", "--checkpoint", str(run_dir / "final"), "--image", image, "--prompt", "?"]
    assert main(ask) == 2
    assert said in capsys.readouterr().err
    assert main(["validate", str(study)]) == 1
    assert said in capsys.readouterr().out
    cache = ["cache", "build", "--study", str(study), "--cache-dir", str(tmp_path / "cache")]
    assert main(cache) == 1
    assert said in capsys.readouterr().out
    assert not list((tmp_path / "cache").rglob("*.npy"))  # nothing built from it


def test_generate_gives_no_answer_about_an_all_zero_image(run, tmp_path, capsys):
    """validate refuses an image that is all zeros once read; generate (and serve, through
    the same read_images) answered on it."""
    from umbrella_core.imaging import save_nifti

    run_dir, _, _ = run
    empty = tmp_path / "empty_T1w.nii.gz"
    save_nifti(empty, np.zeros((16, 16, 16), np.float32), np.eye(4))
    ask = ["generate", "--checkpoint", str(run_dir / "final"), "--image", str(empty)]
    assert main([*ask, "--prompt", "Which hemisphere?"]) == 2
    out, err = capsys.readouterr()
    assert "empty_T1w.nii.gz: all voxels are zero after preprocessing" in err and not out


def test_umbrella_generate_says_when_the_modality_cannot_be_told(run, tmp_path, capsys):
    run_dir, _, _ = run
    odd = tmp_path / "scan.nii.gz"
    odd.write_bytes(b"")
    code = main(["generate", "--checkpoint", str(run_dir / "final"), "--image", str(odd),
                 "--prompt", "?"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "scan.nii.gz" in err and "--modality" in err and "*_T1w.nii.gz" in err


def test_umbrella_evaluate_prints_the_table_of_each_modality(run, capsys):
    run_dir, metrics, _ = run
    assert main(["evaluate", "--checkpoint", str(run_dir / "final"), "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert set(results) == {"t1", "dmri"}
    for key, r in results.items():
        final = metrics["held_out"][key]
        assert r["n"] == final["n"] == 4
        assert r["accuracy"] == final["accuracy"]
        assert r["loss"] == pytest.approx(final["loss"], rel=1e-4)
        for question, q in r["questions"].items():
            assert q["metrics"].keys() == final["questions"][question]["metrics"].keys()
    assert main(["evaluate", "--checkpoint", str(run_dir / "final"), "--split", "train"]) == 0
    out = capsys.readouterr().out.splitlines()
    table = out[out.index(next(line for line in out if line.startswith("modality"))) :]
    assert table[0].split() == ["modality", "question", "n", "metric", "value", "reference"]
    rows = [line.split() for line in table[1:-1]]
    assert [r[:2] for r in rows if r[0] in ("dmri", "t1")] == [["dmri", "(all"], ["t1", "(all"]]
    # Per modality and question: its 8 training samples, the metrics beside their references.
    assert sum("Which hemisphere holds the lesion?" in line for line in table) == 2
    assert sum(line.split()[-2:] == ["chance", "50.0%"] for line in table) == 2
    assert sum(" MAE " in line and "training mean" in line for line in table) == 2
    written = run_dir / "final" / "evaluation-train"
    said = f"written to {written}: metrics.json, predictions.jsonl, 4 figure(s) in figures/"
    assert out[-1] == said
    figures = sorted(p.name for p in (written / "figures").glob("*.png"))
    assert figures == [
        "dmri-what_is_the_ras_x_coordinate_of_the-numeric.png",
        "dmri-which_hemisphere_holds_the_lesion-categorical.png",
        "t1-what_is_the_ras_x_coordinate_of_the-numeric.png",
        "t1-which_hemisphere_holds_the_lesion-categorical.png",
    ]
    predictions = [json.loads(line) for line in (written / "predictions.jsonl").open()]
    assert len(predictions) == 32
    for p in predictions:
        if "hemisphere" in p["question"]:
            assert p["answer"] in ("left", "right") and len(p["probabilities"]) == 2
        else:
            assert "probabilities" not in p and p["answer"] == p["generated"]
        assert isinstance(p["generated"], str) and isinstance(p["ended"], bool)


def test_evaluation_reports_what_umbrella_generate_prints(run, tmp_path, capsys):
    from umbrella_core.data.studies import read_studies
    from umbrella_core.evaluation.engine import not_ending_flag
    from umbrella_core.inference.generate import generate_answer, load_for_inference

    run_dir, _, _ = run
    final, out = run_dir / "final", tmp_path / "evaluation"
    assert main(["evaluate", "--checkpoint", str(final), "--output", str(out), "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    for r in results.values():
        for q in r["questions"].values():
            # The flag is in the JSON, as the table's line under it says it.
            said = not_ending_flag(q["n"], q["metrics"]["n_ended"], q["max_new_tokens"])
            assert q["flag"] == said
    samples = [json.loads(line) for line in (out / "predictions.jsonl").open()]
    assert {s["question"] for s in samples} == {
        "Which hemisphere holds the lesion?",
        "What is the RAS x coordinate of the centre of the lesion, in cm?",
    }
    pm = get_plugin_manager()
    studies = read_studies(load_config(None, SMALL), pm, log=lambda _: None)
    records = {r.source: r for r in studies.records}
    loaded = load_for_inference(final, pm, device="cpu")

    def generate(sample, budget):
        record = records[sample["source"]]
        (image,) = record.images
        prompt = next(t.content for t in record.turns if t.role == "user")  # with its <image>
        return generate_answer(
            loaded, [image.paths], prompt, modalities=[image.modality], max_new_tokens=budget
        )

    for sample in samples:
        # Within the question's budget, umbrella generate prints the generated answer; one
        # that ended is what it prints with its own default budget too.
        assert generate(sample, sample["max_new_tokens"]) == sample["generated"], sample
        if sample["ended"]:
            assert generate(sample, 64) == sample["generated"], sample
    # And through the command line itself, for one sample.
    sample = samples[0]
    record = records[sample["source"]]
    args = ["generate", "--checkpoint", str(final), "--modality", record.images[0].modality]
    prompt = next(t.content for t in record.turns if t.role == "user")
    args += ["--image", ",".join(record.images[0].paths), "--prompt", prompt]
    args += ["--max-new-tokens", str(sample["max_new_tokens"])]
    assert main(args) == 0
    assert capsys.readouterr().out == sample["generated"] + "\n"


def test_early_stopping_stops_when_the_metric_cannot_improve(tmp_path, monkeypatch):
    monkeypatch.setenv("UMBRELLA_CACHE", str(tmp_path / "cache"))
    metrics, lines = _train(
        tmp_path / "run",
        "data.modalities=[t1]",
        "data.geometry={t1: {shape: [16, 16, 16], patch_size: [8, 8, 8]}}",
        "trainer.max_steps=20",
        "trainer.learning_rate=1e-12",  # nothing changes the answers
        "trainer.eval_strategy=steps",
        "trainer.eval_steps=1",
        "trainer.metric_for_best=eval_accuracy",
        "trainer.early_stopping_patience=2",
        "trainer.generate_samples=0",
    )
    assert metrics["steps"] == 3 and metrics["stopped_early_at"] == 3
    assert metrics["best"]["step"] == 1 and metrics["best"]["metric"] == "eval_accuracy"
    assert (tmp_path / "run" / "best" / "model.safetensors").is_file()
    assert any("early stopping at step 3" in line for line in lines)


def test_no_evaluation_when_asked_or_without_held_out_data(tmp_path, monkeypatch):
    from transformers.trainer_utils import IntervalStrategy

    from umbrella_core.train.arguments import training_arguments
    from umbrella_core.train.callbacks import check_evaluation, evaluation_arguments

    config = load_config(None, ["trainer.eval_strategy=no"])
    assert evaluation_arguments(config.trainer) == {"eval_strategy": "no"}
    config = load_config(None, ["trainer.eval_strategy=steps", "trainer.eval_steps=7"])
    args = training_arguments(config, tmp_path)
    assert args.eval_strategy == IntervalStrategy.STEPS and args.eval_steps == 7
    assert args.metric_for_best_model == "eval_loss" and args.greater_is_better is False

    @attrs.define
    class NoHeldOut:
        eval_set: object = None

    said: list[str] = []
    assert check_evaluation(args, NoHeldOut(), {}, said.append) is False
    assert args.eval_strategy == IntervalStrategy.NO and "no held-out" in said[0]


def test_mid_slices_of_3d_and_4d_images():
    from umbrella_core.train.callbacks import slice_panel

    volume = np.zeros((2, 8, 10, 12), dtype=np.float32)
    volume[0, 4, 5, 6] = 1.0  # at the centre: in all three mid-slices
    panel = slice_panel([volume])
    assert panel.dtype == np.uint8 and panel.ndim == 2 and panel.shape[0] >= 128
    assert panel.max() == 255
    series = np.zeros((1, 8, 8, 8, 5), dtype=np.float32)
    series[0, 4, 4, 4, 0] = 1.0  # only in the first frame: the middle frame is empty
    assert slice_panel([series]).max() == 0
    series[0, 4, 4, 4, 2] = 1.0
    two = slice_panel([volume, series])
    assert two.shape[0] > panel.shape[0] and two.max() == 255


def test_guessing_the_modality_from_the_file_name():
    from umbrella_core.inference.generate import guess_modality, with_placeholders
    from umbrella_core.testing import toy_modality

    t1 = attrs.evolve(toy_modality("t1"), file_patterns=("*_T1w.nii.gz",))
    other = attrs.evolve(toy_modality("other"), file_patterns=("*_T1w.nii.gz", "*_x.nii"))
    assert guess_modality("/d/sub-1_T1w.nii.gz", {"t1": t1}) == "t1"
    with pytest.raises(ConfigError, match="fits modalities t1, other; give --modality"):
        guess_modality("/d/sub-1_T1w.nii.gz", {"t1": t1, "other": other})
    with pytest.raises(ConfigError, match=r"sub-1_bold.nii.gz: cannot tell .*\*_x.nii"):
        guess_modality("/d/sub-1_bold.nii.gz", {"t1": t1, "other": other})
    assert with_placeholders("Left or right?", 2) == "<image>\n<image>\nLeft or right?"
    assert with_placeholders("Is <image> like <image>?", 2) == "Is <image> like <image>?"
