"""Plugin discovery, validation, duplicate names, broken and blocked plugins."""

from __future__ import annotations

import json
import subprocess
import sys
import types

import pytest

from umbrella_core import hookimpl
from umbrella_core.errors import DuplicateNameError, PluginError
from umbrella_core.plugins import BLOCK_ENV, PluginManager
from umbrella_core.testing import ToyModalityPlugin, fresh_plugin_manager, toy_modality


def test_hookimpl_with_unknown_argument_is_reported_with_plugin_and_hook():
    class Bad:
        @hookimpl
        def umbrella_patch_embedder(self, spec, width):  # "width" is not a hook argument
            return None

    pm = PluginManager(load_entry_points=False)
    with pytest.raises(PluginError) as err:
        pm.register(Bad(), name="bad-plugin", distribution="bad-dist")
    message = str(err.value)
    assert "bad-plugin" in message and "umbrella_patch_embedder" in message and "width" in message


def test_unknown_hook_is_reported_with_signature_and_plugin_is_not_kept():
    class Typo:
        @hookimpl
        def umbrella_modality(self, extra):  # the hook is umbrella_modalities
            return []

    pm = PluginManager(load_entry_points=False)
    with pytest.raises(PluginError) as err:
        pm.register(Typo(), name="typo")
    assert "umbrella_modality(extra)" in str(err.value)
    assert "umbrella_modalities" in str(err.value)  # lists the known hooks
    assert all(info.name != "typo" for info in pm.plugins())


def test_duplicate_modality_name_names_both_distributions():
    pm = PluginManager(load_entry_points=False)
    pm.register(
        ToyModalityPlugin(toy_modality("t1")), name="a", distribution="umbrella-t1", version="0.1"
    )
    pm.register(
        ToyModalityPlugin(toy_modality("T1")), name="b", distribution="acme-t1", version="2.0"
    )
    with pytest.raises(DuplicateNameError) as err:
        pm.modality_registry()
    assert "umbrella-t1" in str(err.value) and "acme-t1" in str(err.value)


def test_alias_clash_is_a_duplicate_too():
    pm = fresh_plugin_manager(
        ToyModalityPlugin(toy_modality("t1", aliases=("anat",))),
        ToyModalityPlugin(toy_modality("other", aliases=("ANAT",))),
    )
    with pytest.raises(DuplicateNameError, match="'anat'"):
        pm.modality_registry()


def test_modalities_resolve_by_alias_case_insensitively(toy_pm):
    assert toy_pm.resolve_modality("T1W").item.name == "t1"
    with pytest.raises(PluginError, match="unknown modality 'pet'.*dmri, t1"):
        toy_pm.resolve_modality("pet")


def test_wrong_return_type_is_caught_at_registry_build():
    class Wrong:
        @hookimpl
        def umbrella_modalities(self):
            return ["t1"]

    pm = fresh_plugin_manager(Wrong())
    with pytest.raises(PluginError, match="must return ModalitySpec"):
        pm.modality_registry()


class _FakeDist:
    def __init__(self, name, version):
        self.name, self.version = name, version


class _FakeEntryPoint:
    def __init__(self, name, value, dist, loader):
        self.name, self.value, self.dist, self._loader = name, value, dist, loader

    def load(self):
        return self._loader()


def _good_module():
    module = types.ModuleType("good_plugin")
    module.umbrella_modalities = hookimpl(lambda: [toy_modality("good")])
    return module


def _broken_module():
    raise ImportError("No module named 'scipy_not_installed'")


@pytest.fixture
def fake_entry_points(monkeypatch):
    eps = [
        _FakeEntryPoint("good", "good_plugin", _FakeDist("umbrella-good", "1.2"), _good_module),
        _FakeEntryPoint(
            "broken", "broken_plugin", _FakeDist("umbrella-broken", "0.3"), _broken_module
        ),
    ]
    monkeypatch.setattr("umbrella_core.plugins.metadata.entry_points", lambda group: eps)
    return eps


def test_broken_plugin_is_listed_and_does_not_stop_the_others(fake_entry_points):
    pm = PluginManager()
    infos = {info.name: info for info in pm.plugins()}
    assert infos["broken"].status == "broken"
    assert "scipy_not_installed" in infos["broken"].error
    assert infos["broken"].distribution == "umbrella-broken"
    assert infos["good"].status == "loaded" and infos["good"].modalities == ("good",)
    assert pm.resolve_modality("good").distribution == "umbrella-good"


def test_block_env_blocks_by_entry_point_or_distribution(fake_entry_points, monkeypatch):
    monkeypatch.setenv(BLOCK_ENV, "umbrella-good")
    pm = PluginManager()
    infos = {info.name: info for info in pm.plugins()}
    assert infos["good"].status == "blocked"
    with pytest.raises(PluginError, match="unknown modality 'good'"):
        pm.resolve_modality("good")


def test_entry_points_are_loaded_once(monkeypatch):
    calls = []

    def loader():
        calls.append(1)
        return _good_module()

    eps = [_FakeEntryPoint("good", "good_plugin", _FakeDist("umbrella-good", "1.2"), loader)]
    monkeypatch.setattr("umbrella_core.plugins.metadata.entry_points", lambda group: eps)
    pm = PluginManager()
    assert calls == []  # lazily: nothing loads until asked
    pm.modality_registry()
    pm.plugins()
    pm.resolve_modality("good")
    assert calls == [1]


def test_manifest_reader_is_a_builtin_plugin_and_trylast():
    pm = PluginManager(load_entry_points=False)
    info = {i.name: i for i in pm.plugins()}["manifest"]
    assert info.distribution == "umbrella-core" and "umbrella_study_reader" in info.hooks
    seen = []

    class Mine:
        @hookimpl
        def umbrella_study_reader(self, location):
            seen.append(location)
            return iter(()) if location.startswith("mine:") else None

    pm.register(Mine(), name="mine")
    assert list(pm.read_study("mine:x")) == []
    assert seen == ["mine:x"]


def test_import_and_plugins_command_do_not_import_torch():
    code = (
        "import sys, io, contextlib\n"
        "import umbrella_core\n"
        "assert 'torch' not in sys.modules, 'import umbrella_core imported torch'\n"
        "from umbrella_core.commands import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    main(['plugins'])\n"
        "    main(['plugins', '--json'])\n"
        "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_plugins_json_lists_installed_first_party_modalities():
    out = subprocess.run(
        [sys.executable, "-m", "umbrella_core.commands", "plugins", "--json"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    payload = json.loads(out)
    modalities = {m["name"]: m for m in payload["modalities"]}
    assert {"t1", "fmri", "dmri"} <= set(modalities)
    assert modalities["dmri"]["distribution"] == "umbrella-dmri"
    assert modalities["fmri"]["ndim"] == 4
    assert all(m["version"] for m in modalities.values())
