"""A broken plugin is named and set aside; wrong hook results are caught at start-up.

Each test uses a fresh plugin manager (or fake entry points) and a toy plugin
that goes wrong in one way: the error must name the plugin, its distribution
and the hook, and the other plugins must keep working.
"""

from __future__ import annotations

import json
import types

import pytest

from umbrella_core import hookimpl
from umbrella_core.commands import main
from umbrella_core.errors import PluginError
from umbrella_core.plugins import ALLOW_ENV, BLOCK_ENV, PluginManager
from umbrella_core.testing import ToyModalityPlugin, fresh_plugin_manager, toy_modality
from umbrella_core.types import LossTerm


class _Dist:
    def __init__(self, name, version):
        self.name, self.version = name, version


class _EntryPoint:
    def __init__(self, name, dist, loader):
        self.name, self.value, self.dist, self._loader = name, f"{name}_plugin", dist, loader

    def load(self):
        return self._loader()


def _module(**hooks):
    module = types.ModuleType("toy_plugin")
    for name, function in hooks.items():
        setattr(module, name, hookimpl(function))
    return module


def _raise_at_import():
    raise RuntimeError("boom at import")


def _bad_registration():
    # Implements a hook with an argument the hook does not have: refused at registration.
    return _module(umbrella_patch_embedder=lambda spec, width: None)


def _raise_in_hook():
    return _module(umbrella_modalities=lambda: 1 / 0)


def _returns_dict():
    return _module(umbrella_modalities=lambda: {"pet": toy_modality("pet")})


def _returns_strings():
    return _module(umbrella_modalities=lambda: [toy_modality("pet"), "t1"])


def _good():
    return _module(umbrella_modalities=lambda: [toy_modality("good")])


@pytest.fixture
def entry_points(monkeypatch):
    """Install fake entry points: ``install(name=loader, ...)``, plus a good plugin."""

    def install(**loaders):
        eps = [_EntryPoint("good", _Dist("umbrella-good", "1.0"), _good)]
        eps += [
            _EntryPoint(name, _Dist(f"acme-{name}", "0.1"), loader)
            for name, loader in loaders.items()
        ]
        monkeypatch.setattr("umbrella_core.plugins.metadata.entry_points", lambda group: eps)
        return eps

    return install


@pytest.mark.parametrize(
    ("loader", "hook", "fragment"),
    [
        (_raise_at_import, None, "RuntimeError: boom at import"),
        (_bad_registration, "umbrella_patch_embedder", "width"),
        (_raise_in_hook, "umbrella_modalities", "ZeroDivisionError"),
        (_returns_dict, "umbrella_modalities", "got dict"),
        (_returns_strings, "umbrella_modalities", "got str ('t1')"),
    ],
    ids=["import", "registration", "inside-hook", "dict", "non-spec-item"],
)
def test_a_broken_plugin_is_named_and_listed_while_the_others_work(
    entry_points, capsys, loader, hook, fragment
):
    entry_points(bad=loader)
    pm = PluginManager()
    if hook == "umbrella_modalities":
        # Start-up (what train does first) stops, naming plugin, distribution and hook.
        with pytest.raises(PluginError) as err:
            pm.modality_registry()
        message = str(err.value)
        assert "'bad'" in message and "acme-bad" in message and hook in message
        assert fragment in message
        assert "fix the plugin" in message or "ZeroDivisionError" in message
    # Set aside: the others resolve, the broken one is listed with its error.
    assert pm.resolve_modality("good").distribution == "umbrella-good"
    infos = {info.name: info for info in pm.plugins()}
    assert infos["bad"].status == "broken" and infos["bad"].distribution == "acme-bad"
    assert fragment in infos["bad"].error and (hook is None or hook in infos["bad"].error)
    # Asking for a modality it would have provided says why it is missing.
    with pytest.raises(PluginError, match="installed but not loaded: bad \\(acme-bad\\)"):
        pm.resolve_modality("pet")

    # `umbrella plugins` still works (exit 0) and shows it as broken, in both formats.
    assert main(["plugins"]) == 0
    text = capsys.readouterr().out
    assert "good" in text and "[broken]" in text and fragment in text
    assert main(["plugins", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    listed = {p["name"]: p for p in payload["plugins"]}
    assert listed["bad"]["status"] == "broken" and fragment in listed["bad"]["error"]
    assert [m["name"] for m in payload["modalities"]] == ["good"]


def test_only_entry_points_load_and_the_env_lists_are_shown(entry_points, monkeypatch, capsys):
    entry_points(other=_good)
    monkeypatch.setenv(BLOCK_ENV, "acme-other")
    monkeypatch.setenv(ALLOW_ENV, "good,other")
    assert main(["plugins", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["env"] == {BLOCK_ENV: "acme-other", ALLOW_ENV: "good,other"}
    status = {p["name"]: p["status"] for p in payload["plugins"]}
    # Exactly the built-ins and the entry points: nothing else is imported as a plugin.
    assert status == {
        "brainvlm": "loaded",
        "manifest": "loaded",
        "metrics": "loaded",
        "embedder": "loaded",
        "baselines": "loaded",
        "commands": "loaded",
        "export": "loaded",
        "serve": "loaded",
        "launch": "loaded",
        "good": "loaded",
        "other": "blocked",
    }
    assert main(["plugins"]) == 0
    text = capsys.readouterr().out
    assert f"{BLOCK_ENV}=acme-other" in text and f"{ALLOW_ENV}=good,other" in text
    assert "blocked by UMBRELLA_BLOCK_PLUGINS" in text


def test_a_plugin_not_in_the_allow_list_is_not_even_imported(entry_points, monkeypatch):
    imported = []
    entry_points(other=lambda: imported.append(1) or _good())
    monkeypatch.setenv(ALLOW_ENV, "good")
    infos = {info.name: info for info in PluginManager().plugins()}
    assert imported == [] and infos["other"].status == "blocked"
    assert "not in UMBRELLA_LOAD_PLUGINS" in infos["other"].error


# -- patch embedders ---------------------------------------------------------


class _Embedder(ToyModalityPlugin):
    """A toy modality whose embedder is replaced by ``make(spec, hidden_size)``."""

    def __init__(self, make):
        super().__init__(toy_modality("toy"))
        self.make = make

    @hookimpl
    def umbrella_patch_embedder(self, spec, hidden_size):
        return self.make(spec, hidden_size)


def _wrong_tokens(spec, hidden_size):
    import torch.nn as nn

    class Short(nn.Module):
        def forward(self, x):  # one token fewer than spec.num_tokens
            return x.new_zeros(x.shape[0], spec.num_tokens - 1, hidden_size)

    return Short()


def _raises(spec, hidden_size):
    raise KeyError("hidden")


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda spec, hidden_size: "a module", "returned str, expected torch.nn.Module"),
        (_wrong_tokens, "gives output of shape (1, 7, 16)"),
        (_raises, "failed in umbrella_patch_embedder: KeyError"),
    ],
    ids=["not-a-module", "wrong-token-count", "raises"],
)
def test_a_bad_patch_embedder_is_refused_before_step_1_naming_the_plugin(make, fragment):
    pm = fresh_plugin_manager(_Embedder(make))
    spec = pm.resolve_modality("toy").item
    with pytest.raises(PluginError) as err:
        pm.patch_embedder(spec, 16)
    assert "'test-plugin-0'" in str(err.value) and "test-dist-0" in str(err.value)
    assert fragment in str(err.value)


def test_a_bad_embedder_stops_model_building_at_start_up():
    from umbrella_core.config import load_config
    from umbrella_core.model.start import start_model

    pm = fresh_plugin_manager(_Embedder(_wrong_tokens))
    spec = pm.resolve_modality("toy").item
    config = load_config(None, [])
    with pytest.raises(PluginError, match="test-plugin-0.*expected \\(1, 8, "):
        start_model(config.model, {"toy": spec}, pm, loss_terms=[], seed=0)


def test_a_good_embedder_passes_the_check():
    pm = fresh_plugin_manager(ToyModalityPlugin(toy_modality("toy")))
    module = pm.patch_embedder(pm.resolve_modality("toy").item, 16)
    assert sum(p.numel() for p in module.parameters()) > 0


# -- loss terms ----------------------------------------------------------------


class _Loss:
    def __init__(self, result):
        self.result = result

    @hookimpl
    def umbrella_loss_terms(self, modalities, settings):
        return self.result() if callable(self.result) else self.result


@pytest.mark.parametrize(
    ("result", "fragment"),
    [
        ([lambda **_: 0.0], "must return LossTerm values, got function"),
        ({"aux": 1.0}, "must return a list of LossTerm values, got dict"),
        (lambda: [][1], "failed in umbrella_loss_terms: IndexError"),
    ],
    ids=["non-loss-term", "dict", "raises"],
)
def test_bad_loss_terms_are_refused_naming_the_plugin(result, fragment):
    pm = fresh_plugin_manager(_Loss(result))
    with pytest.raises(PluginError) as err:
        pm.loss_terms(("t1",), {})
    assert "'test-plugin-0'" in str(err.value) and "test-dist-0" in str(err.value)
    assert fragment in str(err.value)


def test_good_loss_terms_pass():
    term = LossTerm(name="aux", compute=lambda **_: 0.0)
    assert fresh_plugin_manager(_Loss([term])).loss_terms(("t1",), {}) == [term]


def test_a_reader_that_raises_is_named():
    class Reader:
        @hookimpl
        def umbrella_study_reader(self, location):
            raise AttributeError("oops")

    pm = fresh_plugin_manager(Reader())
    with pytest.raises(PluginError, match="'test-plugin-0'.*failed in umbrella_study_reader"):
        pm.read_study("/nowhere")


def test_a_built_in_may_be_named_in_the_allow_list_but_not_blocked(entry_points, monkeypatch):
    entry_points(other=_good)
    monkeypatch.setenv(ALLOW_ENV, "good,manifest")
    infos = {info.name: info for info in PluginManager().plugins()}
    assert infos["manifest"].status == "loaded" and infos["good"].status == "loaded"
    assert infos["other"].status == "blocked"  # the list still restricts the installed ones
    monkeypatch.setenv(ALLOW_ENV, "")
    monkeypatch.setenv(BLOCK_ENV, "manifest")
    with pytest.raises(PluginError, match="'manifest' is built into umbrella-core and always"):
        PluginManager().plugins()


def test_an_unknown_name_in_the_env_lists_is_refused(entry_points, monkeypatch, capsys):
    entry_points(other=_good)
    monkeypatch.setenv(BLOCK_ENV, "gooood")
    assert main(["plugins"]) == 2
    error = capsys.readouterr().err
    assert f"{BLOCK_ENV}: no installed plugin is named 'gooood'" in error
    assert "installed: good, other" in error and "Traceback" not in error


def test_a_modality_of_a_blocked_plugin_says_it_is_blocked(entry_points, monkeypatch):
    entry_points()
    monkeypatch.setenv(BLOCK_ENV, "good")
    pm = PluginManager()
    with pytest.raises(PluginError, match="installed but not loaded: good .*blocked by"):
        pm.resolve_modality("good")
