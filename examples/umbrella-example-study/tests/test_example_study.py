"""The example study plugin, tested with the plugin author's kit and by training on it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import umbrella_example_study.plugin as plugin

from umbrella_core.errors import ConfigError, DataError


def test_passes_the_study_reader_conformance_checks(umbrella_conformance, example_study, tmp_path):
    # Installed under the entry point "example", hooks valid, None for foreign locations,
    # valid records (existing files, one placeholder per image, a source to open) for its
    # own sample, and bad rows of a broken copy reported through on_error.
    broken = shutil.copytree(example_study, tmp_path / "broken")
    with (broken / "subjects.csv").open("a") as table:
        table.write("sub-06,\n")
    umbrella_conformance.registration(plugin, entry_point="example")
    records = umbrella_conformance.study_reader(
        plugin,
        f"example:{example_study}",
        modalities=("t1",),
        min_records=6,
        bad_location=f"example:{broken}",
    )
    assert [(r.subject, r.turns[1].content, r.split) for r in records] == [
        ("sub-00", "left", "train"),
        ("sub-01", "right", "train"),
        ("sub-02", "left", "train"),
        ("sub-03", "right", "train"),
        ("sub-04", "left", "test"),
        ("sub-05", "right", "test"),
    ]
    assert records[0].images[0].paths == (str(example_study / "sub-00_T1w.nii.gz"),)
    assert records[0].source == f"{example_study / 'subjects.csv'}:2"


def test_the_installed_plugin_reads_through_the_core(example_study):
    from umbrella_core.plugins import get_plugin_manager

    pm = get_plugin_manager()
    info = {p.name: p for p in pm.plugins()}["example"]
    assert info.distribution == "umbrella-example-study" and info.status == "loaded"
    assert info.study_kinds == ("example",) and info.description.startswith("A template")
    records = list(pm.read_study(f"example:{example_study}", {"question": "Side?"}))
    assert len(records) == 6 and records[0].turns[0].content == "<image>\nSide?"


def test_bad_input_names_the_file_line_or_option(example_study, tmp_path):
    reported = []
    with pytest.raises(ConfigError, match="unknown study option 'questoin'"):
        plugin.umbrella_study_reader(f"example:{example_study}", {"questoin": "x"}, reported.append)
    with pytest.raises(DataError, match="no subjects.csv"):
        plugin.umbrella_study_reader(f"example:{tmp_path / 'nothing'}", {}, reported.append)
    table = example_study / "subjects.csv"
    table.write_text("subject,label\nsub-00,left\nsub-01,\n,right\nsub-03,left\n")
    # Each bad row is reported with its line and field, and the good rows still come.
    records = plugin.umbrella_study_reader(f"example:{example_study}", {}, reported.append)
    assert [r.subject for r in records] == ["sub-00", "sub-03"]
    assert [(e.source, e.field) for e in reported] == [
        (f"{table}:3", "label"),
        (f"{table}:4", "subject"),
    ]
    assert str(reported[0]) == f"{table}:3: subject and label must not be empty"


@pytest.mark.slow
def test_umbrella_trains_on_an_example_study(example_study, tmp_path):
    env = {**os.environ, "UMBRELLA_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "umbrella_core.commands",
            "train",
            "--study",
            f"example:{example_study}",
            "--modalities",
            "t1",
            "--set",
            "data.geometry={t1: {shape: [32, 32, 32], patch_size: [8, 8, 8]}}",
            "--max-steps",
            "2",
            "--batch-size",
            "2",
            "--no-progress",
            "--output-dir",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (Path(out) / "final" / "model.safetensors").is_file()
    assert "Traceback" not in result.stderr
