"""The built-in demo leaves out a modality whose plugin gives no phantom, saying so."""

from __future__ import annotations

import json

import attrs
import pytest

from umbrella_core.data.demo import cached_demo, write_demo
from umbrella_core.errors import ConfigError
from umbrella_core.testing import toy_modality

SKIP = "demo: skipping modality 'pet': its plugin gives no phantom"


@pytest.fixture
def specs():
    return {"t1": toy_modality("t1"), "pet": attrs.evolve(toy_modality("pet"), demo=None)}


def _modalities(manifest):
    lines = manifest.read_text().splitlines()
    return {image["modality"] for line in lines for image in json.loads(line)["images"]}


def test_a_modality_without_a_phantom_is_skipped_with_one_line(tmp_path, specs):
    said = []
    manifest = write_demo(tmp_path / "demo", specs, subjects=4, log=said.append)
    assert said == [SKIP]
    assert _modalities(manifest) == {"t1"}
    assert not (tmp_path / "demo" / "pet").exists()


def test_the_cached_demo_says_it_on_every_run(tmp_path, specs, monkeypatch):
    monkeypatch.setenv("UMBRELLA_CACHE", str(tmp_path / "cache"))
    said = []
    provenance = {"t1": "umbrella-t1==1", "pet": "umbrella-pet==1"}
    first = cached_demo(specs, provenance, subjects=4, log=said.append)
    again = cached_demo(specs, provenance, subjects=4, log=said.append)
    assert first == again and said == [SKIP, SKIP]
    assert _modalities(first) == {"t1"}


def test_no_modality_with_a_phantom_is_a_config_error(tmp_path, specs, capsys):
    with pytest.raises(ConfigError, match="no plugin of pet gives a phantom.*--study"):
        write_demo(tmp_path / "demo", {"pet": specs["pet"]}, subjects=4)
    assert SKIP in capsys.readouterr().out  # the default log is print
    assert not (tmp_path / "demo").exists()


def test_a_demo_run_trains_the_others(tmp_path, monkeypatch, capsys):
    # The plugin gives specs only: no embedder (the built-in one serves) and, for
    # pet, no phantom (the demo says so once and trains t1).
    from umbrella_core import hookimpl
    from umbrella_core.config import load_config
    from umbrella_core.testing import fresh_plugin_manager
    from umbrella_core.train.run import train

    class Plugin:
        @hookimpl
        def umbrella_modalities(self):
            return [toy_modality("t1"), attrs.evolve(toy_modality("pet"), demo=None)]

    monkeypatch.setenv("UMBRELLA_CACHE", str(tmp_path / "cache"))
    config = load_config(
        None,
        [
            "data.demo_subjects=6",
            f"trainer.output_dir={tmp_path / 'run'}",
            "trainer.max_steps=2",
            "trainer.batch_size=2",
            "trainer.eval_strategy=no",
            "trainer.progress=false",
        ],
    )
    train(config, fresh_plugin_manager(Plugin()), log=print)
    out = capsys.readouterr().out
    assert out.count(SKIP) == 1
    meta = json.loads((tmp_path / "run" / "final" / "umbrella.json").read_text())
    assert [m["name"] for m in meta["modalities"]] == ["pet", "t1"]
