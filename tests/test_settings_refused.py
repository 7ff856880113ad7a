"""Settings that would train something other than what was meant are refused or said aloud.

Each bad setting is one line naming it (exit 2, no traceback); what is
accepted but surprising (max_steps 0, a record repeated many times) is said
in the run's output.
"""

from __future__ import annotations

import json

import pytest

from umbrella_core.commands import main
from umbrella_core.config import load_config
from umbrella_core.data.studies import read_studies
from umbrella_core.plugins import get_plugin_manager

SMALL = [
    "--modalities",
    "t1",
    "--demo-subjects",
    "6",
    "--set",
    "data.geometry={t1: {shape: [16, 16, 16], patch_size: [8, 8, 8]}}",
    "--no-progress",
]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.learning_rate=.nan", "trainer.learning_rate: must be a positive number, got nan"),
        ("trainer.learning_rate=-1e-3", "trainer.learning_rate: must be a positive number"),
        ("trainer.warmup_ratio=-5", "trainer.warmup_ratio: expected a value in [0, 1], got -5.0"),
        ("trainer.weight_decay=-0.1", "trainer.weight_decay: must be 0 or more"),
        ("trainer.epochs=0", "trainer.epochs: must be a positive number"),
        ("data.workers=-2", "data.workers: must be 0 or more, got -2"),
        ("data.weights={demo/t1: -1}", "data.weights.demo/t1: a sampling weight must be a number"),
        ("data.weights={demo/t1: .inf}", "data.weights.demo/t1: a sampling weight must be"),
        ("trainer.save_steps=-3", "trainer.save_steps: must be 0 or more, got -3"),
        ("trainer.save_total_limit=-1", "trainer.save_total_limit: must be 0 or more, got -1"),
        ("trainer.max_steps=-1", "trainer.max_steps: must be 0 or more, got -1"),
        ("trainer.eval_steps=-4", "trainer.eval_steps: must be 0 or more"),
        ("trainer.generate_samples=-1", "trainer.generate_samples: must be 0 or more"),
        ("trainer.early_stopping_patience=-2", "trainer.early_stopping_patience: must be 0"),
        ("evaluation.baselines=maybe", "evaluation.baselines: expected one of auto, on, off"),
        ("trainer.seed=-1", "trainer.seed: expected a whole number from 0 to 4294967295, got -1"),
        ("trainer.seed=99999999999999999999", "trainer.seed: expected a whole number from 0"),
    ],
)
def test_a_bad_setting_is_one_line_naming_it(override, message, tmp_path, capsys):
    assert main(["train", "--set", override, "--output-dir", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and "Traceback" not in error and "\n" not in error
    assert not (tmp_path / "run").exists()


def test_a_key_written_twice_in_the_yaml_is_refused_with_both_lines(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("trainer:\n  learning_rate: 0.001\n  batch_size: 4\n  learning_rate: 0.1\n")
    assert main(["train", "--config", str(config)]) == 2
    error = capsys.readouterr().err
    assert f"{config}:4: key 'learning_rate' appears twice (also on line 2)" in error


def test_a_misspelt_weights_group_is_refused_naming_the_groups(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("UMBRELLA_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    args = ["train", *SMALL, "--set", "data.weights={demo/t1w: 2}", "--output-dir", str(out)]
    assert main(args) == 2
    error = capsys.readouterr().err
    assert "data.weights.demo/t1w: no such group of training records" in error
    assert "the groups are " in error and "/t1" in error


@pytest.mark.parametrize("given", [["--output-dir", ""], ["--set", "trainer.output_dir= "]])
def test_an_empty_output_folder_is_refused_not_the_working_folder(
    given, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    assert main(["train", *given]) == 2
    assert "trainer.output_dir: must not be empty" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_seed_flag_out_of_range_is_one_line(tmp_path, capsys):
    assert main(["train", "--seed", "-1", "--output-dir", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err
    assert "trainer.seed: expected a whole number" in error and "Traceback" not in error


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            ["--batch-size", "100000000"],
            "trainer.batch_size: an optimizer step of 100000000 samples (batch size 100000000 "
            "x 1 process(es) x 1 accumulation) is more than the 8 training samples",
        ),
        (
            ["--set", "model.max_length=10000000000000"],
            "model.max_length: 10000000000000 tokens, but the language model takes at most",
        ),
    ],
)
def test_a_setting_that_would_train_nothing_sensible_is_refused_before_step_1(
    settings, message, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("UMBRELLA_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert main(["train", *SMALL, *settings, "--output-dir", str(out)]) == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error
    assert not (out / "checkpoint-1").exists()


def test_every_group_at_weight_0_is_refused_naming_the_groups(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("UMBRELLA_CACHE", str(tmp_path / "cache"))
    overrides = ["data.modalities=t1", "data.demo_subjects=6", SMALL[SMALL.index("--set") + 1]]
    (study,) = {
        r.study for r in read_studies(load_config(None, overrides), get_plugin_manager()).records
    }
    out = tmp_path / "run"
    weights = f"data.weights={{{study}/t1: 0}}"
    assert main(["train", *SMALL, "--set", weights, "--output-dir", str(out)]) == 2
    error = capsys.readouterr().err
    assert (
        "data.weights: every group of training records has weight 0, so nothing would be "
        f"drawn; give one of {study}/t1 a positive weight"
    ) in error


def test_numbers_in_exponent_form_are_numbers(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        "trainer:\n  learning_rate: 3e-4\ndata:\n  augment:\n"
        "    t1: [{name: RandGaussianNoise, prob: 1.0, std: 1e-2}]\n"
    )
    loaded = load_config(config, ["trainer.weight_decay=1e-2"])
    assert loaded.trainer.learning_rate == 3e-4 and loaded.trainer.weight_decay == 0.01
    assert loaded.data.augment["t1"][0]["std"] == 0.01  # a number, as MONAI needs it


def test_max_steps_0_says_that_epochs_decide(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("UMBRELLA_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    args = ["train", *SMALL, "--set", "trainer.max_steps=0", "--set", "trainer.epochs=1"]
    args += ["--set", "trainer.eval_strategy=no", "--batch-size", "4", "--output-dir", str(out)]
    assert main(args) == 0
    said = capsys.readouterr().out
    assert "length       1 epoch(s) (trainer.max_steps is 0: epochs decide)" in said
    # With eval_strategy: no the header announces no evaluation it will not run.
    assert "samples, not evaluated (trainer.eval_strategy=no" in said
    assert "evaluation, best/" not in said and "the table at the end" not in said
    # 4 training subjects x 2 questions at 4 a step: one epoch is 2 steps.
    assert json.loads((out / "metrics.json").read_text())["steps"] == 2


def test_a_record_repeated_many_times_is_warned_about(tmp_path):
    t1 = tmp_path / "sub-01_T1w.nii.gz"
    t1.write_bytes(b"")  # read_studies does not open images
    line = {
        "subject": "sub-01",
        "images": [{"modality": "t1", "path": t1.name}],
        "conversation": [
            {"role": "user", "content": "<image>\nWhich side?"},
            {"role": "assistant", "content": "left"},
        ],
    }
    other = {**line, "subject": "sub-02"}
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in [line] * 200 + [other] * 15) + "\n")
    config = load_config(None, ["data.modalities=[t1]", f"data.studies=[{manifest}]"])
    said: list[str] = []
    read_studies(config, get_plugin_manager(), log=said.append)
    (warning,) = [s for s in said if s.startswith("warning:")]
    assert "213 record(s) repeat another exactly" in warning
    assert f"{manifest}:1, appears 200 times (93% of the records)" in warning
    # umbrella validate says it as training does (and in its JSON).
    from umbrella_core.validate import validate_locations

    report = validate_locations([str(manifest)], get_plugin_manager())
    assert report.warnings == (warning,) and report.to_json()["warnings"] == [warning]
