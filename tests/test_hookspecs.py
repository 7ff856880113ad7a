"""The plugin API reference: every hook is documented and exercised by the tests."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from umbrella_core import hookspecs

HOOKS = sorted(n for n in dir(hookspecs) if n.startswith("umbrella_"))
TESTS = Path(__file__).parent


def test_the_six_roles_have_hooks():
    assert HOOKS == [
        "umbrella_augmentations",
        "umbrella_baselines",
        "umbrella_commands",  # the command line: the core's own commands come through it too
        "umbrella_loss_terms",
        "umbrella_metrics",
        "umbrella_modalities",
        "umbrella_patch_embedder",
        "umbrella_study_kinds",  # not a role: names the reader's kinds for `umbrella plugins`
        "umbrella_study_reader",
    ]


@pytest.mark.parametrize("name", HOOKS)
def test_every_hook_documents_arguments_return_style_and_version(name):
    hook = getattr(hookspecs, name)
    doc = inspect.getdoc(hook) or ""
    assert "Returns:" in doc and "Since:" in doc
    first_result = hook.umbrella_spec.get("firstresult", False)
    assert ("First result" in doc) == first_result
    for argument in inspect.signature(hook).parameters:
        assert argument in doc, f"{name}: argument {argument!r} is not documented"


@pytest.mark.parametrize("name", HOOKS)
def test_every_hook_is_implemented_in_a_test(name):
    sources = [p.read_text() for p in TESTS.glob("test_*.py") if p.name != Path(__file__).name]
    assert any(f"def {name}(" in source for source in sources)
