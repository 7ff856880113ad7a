"""What each plugin offers, by name, in `umbrella plugins`; the built-in default patch embedder.

The host (umbrella_core.plugins) lists every plugin with its description and
the modalities, study kinds, loss terms and metric families its hooks give;
the modality registry (umbrella_core.modality_registry) is its own module.
"""

from __future__ import annotations

import json
import types

import attrs
import pytest

from umbrella_core import Augmentation, LossTerm, MetricFamily, hookimpl
from umbrella_core.commands import main
from umbrella_core.errors import DuplicateNameError, PluginError
from umbrella_core.modality_registry import ModalityRegistry, Provided
from umbrella_core.plugins import PluginManager
from umbrella_core.testing import ToyModalityPlugin, fresh_plugin_manager, toy_modality

# -- the default patch embedder ------------------------------------------------


class SpecOnly:
    """A modality plugin that gives a ModalitySpec and no patch embedder."""

    def __init__(self, *specs):
        self.specs = specs

    @hookimpl
    def umbrella_modalities(self):
        return list(self.specs)


def test_a_modality_without_a_plugin_embedder_gets_the_built_in_one():
    import torch

    from umbrella_core.model.patch import PatchEmbedding

    pm = fresh_plugin_manager(SpecOnly(toy_modality("pet", channels=2)))
    spec = pm.resolve_modality("pet").item
    module = pm.patch_embedder(spec, 16)
    assert type(module) is PatchEmbedding
    x = torch.randn(2, *spec.input_shape, requires_grad=True)
    out = module(x)
    assert out.shape == (2, spec.num_tokens, 16)
    out.sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in module.parameters())
    info = {i.name: i for i in pm.plugins()}["embedder"]
    assert info.distribution == "umbrella-core" and info.hooks == ("umbrella_patch_embedder",)


class _Marked(ToyModalityPlugin):
    """A modality plugin whose own embedder is recognisable."""

    @hookimpl
    def umbrella_patch_embedder(self, spec, hidden_size):
        module = super().umbrella_patch_embedder(spec=spec, hidden_size=hidden_size)
        if module is not None:
            module.marked = True
        return module


def test_a_plugin_embedder_wins_over_the_default():
    # The built-in is registered first and trylast: the plugin is asked first either way.
    pm = fresh_plugin_manager(_Marked(toy_modality("pet")), SpecOnly(toy_modality("other")))
    assert getattr(pm.patch_embedder(pm.resolve_modality("pet").item, 16), "marked", False)
    assert not hasattr(pm.patch_embedder(pm.resolve_modality("other").item, 16), "marked")


def test_without_the_built_ins_a_modality_with_no_embedder_is_an_error():
    pm = PluginManager(load_entry_points=False, load_defaults=False)
    pm.register(SpecOnly(toy_modality("pet")), name="pet")
    with pytest.raises(PluginError, match="no installed plugin provides a patch embedder"):
        pm.patch_embedder(pm.resolve_modality("pet").item, 16)


def test_the_kit_checks_a_plugin_that_relies_on_the_default():
    from umbrella_core.testing import check_patch_embedder

    plugin = SpecOnly(toy_modality("pet"))
    check_patch_embedder(plugin, toy_modality("pet"), hidden_size=16)


# -- what each plugin offers, by name ----------------------------------------------


class Everything:
    """A plugin offering one of each: shown in `umbrella plugins`."""

    @hookimpl
    def umbrella_modalities(self):
        return [toy_modality("pet")]

    @hookimpl
    def umbrella_study_kinds(self):
        return ["oasis3", "adni"]

    @hookimpl
    def umbrella_loss_terms(self, modalities):
        return (
            [LossTerm(name="pet_smoothness", compute=lambda **_: 0.0)]
            if "pet" in modalities
            else []
        )

    @hookimpl
    def umbrella_metrics(self):
        return [
            MetricFamily(
                name="updrs", applies=lambda question, answers: "UPDRS" in question, compute=dict
            )
        ]

    @hookimpl
    def umbrella_augmentations(self):
        return [Augmentation(name="RandTracerUptake", build=dict, modalities=("pet",))]


def test_plugins_lists_what_each_plugin_offers_by_name():
    pm = fresh_plugin_manager(Everything())
    infos = {info.name: info for info in pm.plugins()}
    mine = infos["test-plugin-0"]
    assert mine.description == "A plugin offering one of each: shown in `umbrella plugins`."
    assert mine.modalities == ("pet",)
    assert mine.study_kinds == ("oasis3", "adni")
    assert mine.loss_terms == ("pet_smoothness",)
    assert mine.metrics == ("updrs",)
    assert mine.augmentations == ("RandTracerUptake",)
    assert pm.augmentations()["RandTracerUptake"].modalities == ("pet",)
    assert mine.error is None
    assert infos["metrics"].metrics == ("categorical", "numeric", "text")
    assert infos["manifest"].study_kinds == ("manifest",)
    assert infos["brainvlm"].study_kinds == ("brainvlm",)
    assert all(info.description for info in infos.values())
    payload = mine.to_json()
    assert payload["study_kinds"] == ["oasis3", "adni"] and payload["metrics"] == ["updrs"]
    assert json.loads(json.dumps(payload)) == payload


@pytest.mark.parametrize(
    ("kinds", "fragment"),
    [
        (lambda: "oasis3", "must return a list of str values, got str ('oasis3')"),
        (lambda: ["oasis3", 3], "must return str values, got int (3)"),
        (lambda: 1 / 0, "failed in umbrella_study_kinds: ZeroDivisionError"),
    ],
    ids=["a-string", "not-a-string", "raises"],
)
def test_a_bad_study_kinds_hook_is_shown_as_the_plugins_error(kinds, fragment):
    module = types.ModuleType("kinds_plugin")
    module.umbrella_study_kinds = hookimpl(kinds)
    pm = fresh_plugin_manager(module, Everything())
    infos = {info.name: info for info in pm.plugins()}
    assert infos["test-plugin-0"].status == "loaded" and fragment in infos["test-plugin-0"].error
    assert "'test-plugin-0'" in infos["test-plugin-0"].error
    assert infos["test-plugin-1"].study_kinds == ("oasis3", "adni")  # the others still listed


class _Dist:
    def __init__(self, name, version, summary=None):
        self.name, self.version = name, version
        self.metadata = {"Summary": summary} if summary is not None else {}


class _EntryPoint:
    def __init__(self, name, dist, module):
        self.name, self.value, self.dist, self._module = name, f"{name}_plugin", dist, module

    def load(self):
        if isinstance(self._module, Exception):
            raise self._module
        return self._module


def _reader_module(doc):
    module = types.ModuleType("reader_plugin", doc)
    module.umbrella_study_kinds = hookimpl(lambda: ["oasis3"])
    return module


def test_the_description_is_the_summary_else_the_module_docstring(monkeypatch, capsys):
    eps = [
        _EntryPoint(
            "oasis",
            _Dist("umbrella-oasis", "1.0", "UMBRELLA reader: OASIS-3."),
            _reader_module("x"),
        ),
        _EntryPoint("nosummary", _Dist("acme", "0.1"), _reader_module("Reads ACME.\n\nMore.")),
        _EntryPoint("broken", _Dist("acme-broken", "0.2", "Broken."), ImportError("nope")),
    ]
    monkeypatch.setattr("umbrella_core.plugins.metadata.entry_points", lambda group: eps)
    infos = {info.name: info for info in PluginManager().plugins()}
    assert infos["oasis"].description == "UMBRELLA reader: OASIS-3."
    assert infos["nosummary"].description == "Reads ACME."
    assert infos["broken"].description == "Broken." and infos["broken"].status == "broken"

    assert main(["plugins"]) == 0
    text = capsys.readouterr().out
    assert "UMBRELLA reader: OASIS-3.\n      study kinds: oasis3\n" in text
    assert "metrics: categorical, numeric, text" in text
    assert main(["plugins", "--json"]) == 0
    listed = {p["name"]: p for p in json.loads(capsys.readouterr().out)["plugins"]}
    assert listed["oasis"]["study_kinds"] == ["oasis3"]
    assert listed["oasis"]["description"] == "UMBRELLA reader: OASIS-3."


def test_the_installed_first_party_plugins_say_what_they_offer(capsys):
    assert main(["plugins", "--json"]) == 0
    listed = {p["name"]: p for p in json.loads(capsys.readouterr().out)["plugins"]}
    if "studies" in listed:
        assert listed["studies"]["study_kinds"] == ["bids", "abcd", "ukb", "hcp", "hbn", "abide"]
        assert "BIDS" in listed["studies"]["description"]
    if "example" in listed:
        assert listed["example"]["study_kinds"] == ["example"]
    for name in {"t1", "fmri", "dmri"} & set(listed):
        # They rely on the built-in embedder: a modality plugin needs only its spec.
        assert listed[name]["modalities"] == [name]
        assert "umbrella_patch_embedder" not in listed[name]["hooks"]
    assert listed["metrics"]["metrics"] == ["categorical", "numeric", "text"]


# -- the modality registry --------------------------------------------------------


def _provided(spec, plugin="p", distribution="d"):
    return Provided(spec, plugin, distribution, "1.0")


def test_the_registry_resolves_names_and_aliases_and_refuses_duplicates():
    t1 = toy_modality("t1", aliases=("T1w",))
    registry = ModalityRegistry.from_provided([_provided(t1), _provided(toy_modality("fmri"))])
    assert registry.resolve(" T1W ").item is t1
    assert list(registry.by_name) == ["t1", "fmri"]
    with pytest.raises(
        PluginError, match="unknown modality 'pet'.*fmri, t1; .*installed but not loaded: x"
    ):
        registry.resolve("pet", broken=["x (acme): ImportError"])
    clash = attrs.evolve(toy_modality("anat"), aliases=("t1w",))
    with pytest.raises(DuplicateNameError, match="'t1w'.*'p' .*d 1.0.*'q'.*e 1.0.*; block it"):
        ModalityRegistry.from_provided(
            [_provided(t1), _provided(clash, "q", "e")], remedy="block it"
        )
