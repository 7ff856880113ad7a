"""The command line as a user meets it: demo data, errors as one line, configuration."""

from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nib
import pytest

from umbrella_core.commands import build_parser, main
from umbrella_core.commands.listing import plugins_listing
from umbrella_core.config import load_config
from umbrella_core.errors import ConfigError
from umbrella_core.hookspecs import hookimpl
from umbrella_core.testing import fresh_plugin_manager
from umbrella_core.types import Command


def _umbrella(*args, **kwargs):
    return subprocess.run(
        [sys.executable, "-m", "umbrella_core.commands", *args],
        capture_output=True,
        text=True,
        **kwargs,
    )


def test_demo_data_writes_real_nifti_files_and_a_manifest(tmp_path):
    assert main(["demo-data", str(tmp_path), "--subjects", "5"]) == 0
    records = [json.loads(line) for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert {r["images"][0]["modality"] for r in records} == {"t1", "fmri", "dmri"}
    # 5 subjects per modality, each asked the hemisphere and (t1, dmri: their plugins
    # give a Demo.measure) the lesion's x coordinate.
    assert len(records) == 5 * 2 + 5 * 2 + 5
    assert sum(r["split"] == "test" for r in records) == 5  # one subject held out per modality
    for record in records:
        paths = record["images"][0]["path"]
        for path in [paths] if isinstance(paths, str) else paths:
            image = nib.load(tmp_path / path)
            assert image.shape and (tmp_path / path).name.endswith(".nii.gz")
        question, answer = (turn["content"] for turn in record["conversation"])
        if "hemisphere" in question:
            assert answer in ("left", "right")
        else:
            # The RAS x coordinate of the lesion's centre: negative on the left.
            assert "RAS x coordinate" in question and answer.endswith(" cm")
            assert (int(answer[:-3]) < 0) == (record["phenotypes"]["label"] == "left")
    bold = next(r for r in records if r["images"][0]["modality"] == "fmri")
    header = nib.load(tmp_path / bold["images"][0]["path"]).header
    assert len(header.get_data_shape()) == 4 and header.get_zooms()[3] > 0  # TR is written


def test_unknown_modality_is_one_clear_line_and_exit_2(tmp_path):
    result = _umbrella("train", "--modalities", "t1,pet", "--output-dir", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "unknown modality 'pet'" in result.stderr and "Traceback" not in result.stderr


def test_bad_setting_names_the_key(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("trainer:\n  learning_rate: fast\n")
    result = _umbrella("train", "--config", str(config))
    assert result.returncode == 2 and "trainer.learning_rate: expected float" in result.stderr


def test_missing_image_stops_before_training_naming_file_and_manifest(tmp_path):
    (tmp_path / "m.jsonl").write_text(
        json.dumps(
            {
                "subject": "s1",
                "images": [{"modality": "t1", "path": "gone_T1w.nii.gz"}],
                "conversation": [
                    {"role": "user", "content": "<image>\nSide?"},
                    {"role": "assistant", "content": "left"},
                ],
            }
        )
        + "\n"
    )
    result = _umbrella(
        "train",
        "--data",
        str(tmp_path / "m.jsonl"),
        "--modalities",
        "t1",
        "--output-dir",
        str(tmp_path / "out"),
    )
    assert result.returncode == 2
    assert "gone_T1w.nii.gz: file not found" in result.stderr and "m.jsonl:1" in result.stderr
    assert not (tmp_path / "out" / "final").exists()


def test_yaml_then_overrides(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        "model:\n  trainable: projector\ntrainer:\n  batch_size: 4\n  learning_rate: 1e-4\n"
    )
    loaded = load_config(config, ["trainer.batch_size=8", "data.modalities=t1,dmri"])
    assert loaded.model.trainable == "projector"
    assert loaded.trainer.batch_size == 8 and loaded.trainer.learning_rate == 1e-4
    assert loaded.data.modalities == ("t1", "dmri")
    with pytest.raises(ConfigError, match="unknown setting model.trainabel"):
        load_config(None, ["model.trainabel=full"])
    with pytest.raises(ConfigError, match="trainer.batch_size: must be a positive number"):
        load_config(None, ["trainer.batch_size=0"])


@pytest.mark.slow
def test_train_from_a_saved_llava_folder_trains_only_the_embedders(tmp_path):
    from umbrella_core.model.build import load_base

    llava, tokenizer, _ = load_base("tiny", seed=5)
    llava.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    env = {**__import__("os").environ, "UMBRELLA_CACHE": str(tmp_path / "cache")}
    result = _umbrella(
        "train",
        "--model",
        str(tmp_path / "base"),
        "--modalities",
        "dmri",
        "--max-steps",
        "3",
        "--demo-subjects",
        "5",
        "--batch-size",
        "2",
        "--no-progress",
        "--output-dir",
        str(tmp_path / "run"),
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert "trainable    embedders" in result.stdout
    from safetensors.torch import load_file

    trained = load_file(tmp_path / "run" / "final" / "model.safetensors")
    base = llava.state_dict()
    lm_key = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert __import__("torch").equal(trained[f"llava.{lm_key}"], base[lm_key])  # frozen


def _study_with_one_bad_record(tmp_path):
    from umbrella_core.data.demo import write_demo
    from umbrella_core.plugins import get_plugin_manager

    spec = get_plugin_manager().resolve_modality("dmri").item.for_demo()
    manifest = write_demo(tmp_path / "study", {"dmri": spec}, subjects=6)
    lines = manifest.read_text().splitlines()
    record = json.loads(lines[0])
    record["images"][0]["path"] = ["dmri/missing_FA.nii.gz", "dmri/missing_MD.nii.gz"]
    lines[0] = json.dumps(record)
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def test_bad_sample_stops_before_step_1_by_default(tmp_path, monkeypatch):
    manifest = _study_with_one_bad_record(tmp_path)
    out = tmp_path / "out"
    result = _umbrella(
        "train",
        "--study",
        str(manifest),
        "--modalities",
        "dmri",
        "--max-steps",
        "1",
        "--no-progress",
        "--output-dir",
        str(out),
    )
    assert result.returncode == 2
    assert "2 problem(s) in the data; nothing was trained" in result.stderr
    assert "manifest.jsonl:1" in result.stderr and "missing_FA.nii.gz" in result.stderr
    assert not (out / "final").exists()


@pytest.mark.slow
def test_bad_sample_is_skipped_and_counted_when_asked(tmp_path):
    manifest = _study_with_one_bad_record(tmp_path)
    out = tmp_path / "out"
    result = _umbrella(
        "train",
        "--study",
        str(manifest),
        "--modalities",
        "dmri",
        "--max-steps",
        "1",
        "--batch-size",
        "2",
        "--no-progress",
        "--output-dir",
        str(out),
        "--set",
        "data.on_bad=skip",
        # Also: forked DataLoader workers over packed records (training and the
        # final evaluation), length batching from the lengths screening found.
        "--set",
        "data.workers=2",
        "--set",
        "data.batching=length",
    )
    assert result.returncode == 0, result.stderr
    assert "skipping 2 bad sample(s)" in result.stdout
    assert "length batching:" in result.stdout and "answers of final/" in result.stdout
    bad = json.loads((out / "bad_samples.json").read_text())
    assert {b["source"] for b in bad} == {f"{manifest}:1"}
    # Each problem once, with how many records it refused.
    assert sum(b["records"] for b in bad) == 2
    assert len({json.dumps(b, sort_keys=True) for b in bad}) == len(bad)
    assert (out / "final" / "model.safetensors").is_file()


def _specs(*overrides):
    from umbrella_core.data.studies import resolve_specs
    from umbrella_core.plugins import get_plugin_manager

    return resolve_specs(load_config(None, list(overrides)), get_plugin_manager(), demo=True)[0]


def test_preprocessing_settings_reach_the_plugins_loaders(tmp_path):
    from umbrella_core.data.demo import write_demo

    plain = _specs("data.modalities=t1,fmri")
    tuned = _specs(
        "data.modalities=t1,fmri",
        "data.preprocessing.t1.spacing=9.0",
        "data.preprocessing.fmri.target_tr=1.0",
    )
    manifest = write_demo(tmp_path, plain, subjects=1)
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    paths = {r["images"][0]["modality"]: [str(tmp_path / r["images"][0]["path"])] for r in records}
    # A 9 mm grid shows a smaller head than the default spacing on the same 32^3 input.
    coarse = tuned["t1"].load(tuned["t1"], paths["t1"])
    fine = plain["t1"].load(plain["t1"], paths["t1"])
    assert (coarse != 0).sum() < 0.5 * (fine != 0).sum()
    # Resampled to TR 1 s, the demo's TR 2 s series has twice the frames (minus one).
    frames = plain["fmri"].windows.frames(plain["fmri"], paths["fmri"])
    assert tuned["fmri"].windows.frames(tuned["fmri"], paths["fmri"]) == 2 * frames - 1


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.preprocessing.t1.spaceing=1.0", "data.preprocessing.t1: unknown setting 'spaceing'"),
        ("data.preprocessing.t1.spacing=-1", "spacing must be a positive number"),
        ("data.preprocessing.dmri.spacing=1", "the dmri plugin takes no preprocessing settings"),
        ("data.preprocessing.pet.x=1", "'pet' is not an active modality"),
    ],
)
def test_bad_preprocessing_settings_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        _specs(override)


def test_an_error_during_training_gets_a_line_of_its_own_below_the_progress_bar(
    tmp_path, capsys, monkeypatch
):
    from umbrella_core.data.demo import write_demo

    monkeypatch.setenv("UMBRELLA_CACHE", str(tmp_path / "cache"))
    manifest = write_demo(tmp_path / "study", _specs("data.modalities=t1"), subjects=4)
    # Truncated data passes the default (header) check and fails when decoded, mid-run.
    victim = sorted((tmp_path / "study" / "t1").glob("*.nii.gz"))[-1]
    raw = victim.read_bytes()
    victim.write_bytes(raw[: len(raw) // 2])
    config = tmp_path / "study" / "run.yaml"
    args = ["train", "--config", str(config), "--study", str(manifest)]
    args += ["--max-steps", "6", "--batch-size", "1", "--output-dir", str(tmp_path / "out")]
    assert main(args) == 2
    lines = capsys.readouterr().err.splitlines()
    assert any("it/s]" in line or "s/it]" in line for line in lines), lines  # a bar was drawn
    assert lines[-1].startswith("umbrella: error: ") and victim.name in lines[-1], lines[-3:]


# -- commands come from plugins --------------------------------------------------------


class _Greet:
    """A third-party plugin that adds ``umbrella greet``."""

    @hookimpl
    def umbrella_commands(self):
        def arguments(parser):
            parser.add_argument("name")
            parser.add_argument("--times", type=int, default=1)

        def run(args):
            print(" ".join([f"hello {args.name}"] * args.times))
            return 3

        return [Command(name="greet", help="say hello", add_arguments=arguments, run=run)]


class _TakesTrain:
    """A plugin that offers a command named as one of the core's."""

    @hookimpl
    def umbrella_commands(self):
        return [Command(name="train", help="mine", add_arguments=print, run=print)]


class _Broken:
    @hookimpl
    def umbrella_commands(self):
        raise RuntimeError("no commands today")


def test_a_plugin_adds_a_command(capsys):
    pm = fresh_plugin_manager(_Greet())
    parser = build_parser(pm)
    args = parser.parse_args(["greet", "world", "--times", "2"])
    assert args.func(args) == 3
    assert capsys.readouterr().out == "hello world hello world\n"
    assert "greet" in parser.format_help() and "say hello" in parser.format_help()
    listing = plugins_listing(pm)
    greet = next(p for p in listing.payload["plugins"] if p["commands"] == ["greet"])
    assert greet["status"] == "loaded"


def test_the_core_commands_are_plugins_too():
    pm = fresh_plugin_manager()
    names = [provided.item.name for provided in pm.commands()]
    assert names == [
        "plugins", "train", "demo-data", "validate", "cache",
        "generate", "evaluate", "export", "serve", "launch",
    ]  # fmt: skip
    by_plugin = {p.item.name: p.plugin for p in pm.commands()}
    assert by_plugin["serve"] == "serve" and by_plugin["launch"] == "launch"
    assert by_plugin["train"] == "commands"


def test_a_command_name_taken_or_a_failing_hook_sets_the_plugin_aside_and_leaves_the_rest():
    pm = fresh_plugin_manager(_TakesTrain(), _Broken(), _Greet())
    names = [provided.item.name for provided in pm.commands()]
    assert names.count("train") == 1 and "greet" in names
    parser = build_parser(pm)
    assert parser.parse_args(["train", "--max-steps", "3"]).max_steps == 3  # the core's train
    infos = {info.name: info for info in pm.plugins()}
    taken = next(i for i in infos.values() if i.module == __name__ and "train" in str(i.error))
    assert taken.status == "broken" and "'train' is offered by plugin 'commands'" in taken.error
    broken = next(i for i in infos.values() if "no commands today" in str(i.error))
    assert broken.status == "broken" and "failed in umbrella_commands" in broken.error
    text = plugins_listing(pm).text
    assert "no commands today" in text


def test_every_command_answers_help_in_a_fresh_process():
    """The commands' parsers are built from the plugins: each one's --help works."""
    out = _umbrella("--help")
    assert out.returncode == 0
    for name in ("train", "evaluate", "generate", "export", "serve", "launch", "cache"):
        assert name in out.stdout
    helped = _umbrella("launch", "--help")
    assert helped.returncode == 0 and "--scheduler" in helped.stdout
    assert "umbrella launch --scheduler slurm|lsf" in helped.stdout


def test_the_listing_shows_each_modalitys_description():
    from umbrella_core.plugins import get_plugin_manager

    pm = get_plugin_manager()
    listing = plugins_listing(pm)
    described = {m["name"]: m["description"] for m in listing.payload["modalities"]}
    for name, provided in pm.modality_registry().items():
        assert described[name] == provided.item.description
        if provided.item.description:
            assert provided.item.description in listing.text
    assert any(described.values())
