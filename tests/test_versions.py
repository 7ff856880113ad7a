"""Versions that keep their promises.

* Every "Since X" of the plugin API names a version the core has reached.
* First-party plugins require a core that exists, no older than the first one
  published (0.4.0).
* The preprocessed cache and the header index key their entries on the
  version of the plugin that loaded an image (and on
  ``umbrella_core.constants.IMAGING_VERSION`` for the shared helpers), and the
  header index on ``CHECKS_VERSION`` for the core's rules (data/checks.py): a
  change to that code without a version bump would serve arrays, or check
  outcomes, of the old code.
  ``tests/versions.json`` records, per unit, a digest of that code beside its
  version; the code changing while the version stays is a failure that says
  what to bump.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
from pathlib import Path

import pytest
import tomllib

import umbrella_core
from umbrella_core.constants import CHECKS_VERSION, IMAGING_VERSION

ROOT = Path(__file__).resolve().parents[1]
RECORD = ROOT / "tests" / "versions.json"
FIRST_PUBLISHED = (0, 4)

#: What each unit's arrays are made by: whole modules, and the loader hooks'
#: functions of a plugin module (its questions and phantoms may change freely).
LOADING_CODE = {
    "umbrella-core imaging": {
        "umbrella_core/imaging/files.py": None,
        "umbrella_core/imaging/formats.py": None,
        "umbrella_core/imaging/frames.py": None,
        "umbrella_core/imaging/header.py": None,
        "umbrella_core/imaging/intensity.py": None,
        "umbrella_core/imaging/nifti.py": None,
    },
    "umbrella-core checks": {
        "umbrella_core/data/checks.py": None,
    },
    "umbrella-t1": {
        "plugins/umbrella_t1/umbrella_t1/preprocess.py": None,
        "plugins/umbrella_t1/umbrella_t1/plugin.py": ("load", "companions", "configure"),
    },
    "umbrella-fmri": {
        "plugins/umbrella_fmri/umbrella_fmri/preprocess.py": None,
        "plugins/umbrella_fmri/umbrella_fmri/window.py": None,
        "plugins/umbrella_fmri/umbrella_fmri/plugin.py": ("load", "companions", "configure"),
    },
    "umbrella-dmri": {
        "plugins/umbrella_dmri/umbrella_dmri/preprocess.py": None,
        "plugins/umbrella_dmri/umbrella_dmri/dwi.py": None,
        "plugins/umbrella_dmri/umbrella_dmri/plugin.py": ("load", "companions"),
    },
}
PLUGINS = {
    "umbrella-t1": "plugins/umbrella_t1",
    "umbrella-fmri": "plugins/umbrella_fmri",
    "umbrella-dmri": "plugins/umbrella_dmri",
    "umbrella-studies": "plugins/umbrella_studies",
}


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def _pyproject(folder: str) -> dict:
    return tomllib.loads((ROOT / folder / "pyproject.toml").read_text())


def _unit_version(unit: str) -> str:
    if unit == "umbrella-core imaging":
        return str(IMAGING_VERSION)
    if unit == "umbrella-core checks":
        return str(CHECKS_VERSION)
    return _pyproject(PLUGINS[unit])["project"]["version"]


def _code(node: ast.AST) -> str:
    """What ``node`` does: its code without imports, docstrings, comments or layout.

    An import moved to another path or a reworded docstring changes no array the
    code makes; anything else (a renamed variable included) counts as a change.
    """

    class Strip(ast.NodeTransformer):
        def visit_Import(self, _: ast.AST) -> None:
            return None

        visit_ImportFrom = visit_Import

        def generic_visit(self, node: ast.AST) -> ast.AST:
            body = getattr(node, "body", None)
            if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
                value = body[0].value
                if isinstance(value, ast.Constant) and isinstance(value.value, str):
                    node.body = body[1:] or [ast.Pass()]
            return super().generic_visit(node)

    return ast.unparse(Strip().visit(node))


def loading_digest(files: dict[str, tuple[str, ...] | None], root: Path = ROOT) -> str:
    """sha256 over the loading code: whole files, or the named functions only (:func:`_code`)."""
    digest = hashlib.sha256()
    for relative, functions in sorted(files.items()):
        tree = ast.parse((root / relative).read_text())
        if functions is None:
            code = _code(tree)
        else:
            found = {
                node.name: node
                for node in tree.body
                if isinstance(node, ast.FunctionDef) and node.name in functions
            }
            missing = sorted(set(functions) - set(found))
            assert not missing, f"{relative}: no function {', '.join(missing)}"
            code = "\n".join(_code(found[name]) for name in functions)
        digest.update(relative.encode() + b"\0" + code.encode() + b"\0")
    return digest.hexdigest()


def stale_units(record: dict, root: Path = ROOT, version=_unit_version) -> list[str]:
    """Each unit whose loading code or version no longer matches the record, and what to do."""
    problems = []
    for unit, files in LOADING_CODE.items():
        now, recorded = loading_digest(files, root), record.get(unit, {})
        version_now = version(unit)
        entry = json.dumps({unit: {"version": version_now, "sha256": now}})
        where = ", ".join(
            f"{Path(path).name}" + (f" ({', '.join(funcs)})" if funcs else "")
            for path, funcs in files.items()
        )
        if now != recorded.get("sha256") and version_now == recorded.get("version"):
            bump = {
                "umbrella-core imaging": "IMAGING_VERSION in umbrella_core/constants.py",
                "umbrella-core checks": "CHECKS_VERSION in umbrella_core/constants.py",
            }.get(unit) or f"the version in {PLUGINS[unit]}/pyproject.toml (and its CHANGELOG)"
            problems.append(
                f"{unit}: its loading code changed ({where}) but its version is still "
                f"{version_now}; the preprocessed cache and the header index key on it and "
                f"would serve arrays of the old code: raise {bump}, then record "
                f'"{unit}": {{"version": <the new version>, "sha256": "{now}"}} in '
                "tests/versions.json"
            )
        elif version_now != recorded.get("version") or now != recorded.get("sha256"):
            problems.append(f"{unit}: version {version_now}: record {entry} in tests/versions.json")
    return problems


def test_loading_code_changes_only_with_a_version_bump():
    problems = stale_units(json.loads(RECORD.read_text()))
    assert not problems, "\n".join(problems)


def test_a_stale_loader_change_is_caught(tmp_path):
    """The check bites: a loader edited in a copy of the tree, its version left, fails."""
    record = json.loads(RECORD.read_text())
    for files in LOADING_CODE.values():
        for relative in files:
            (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / relative).write_text((ROOT / relative).read_text())
    assert stale_units(record, tmp_path) == []
    loader = tmp_path / "plugins/umbrella_t1/umbrella_t1/preprocess.py"
    loader.write_text(loader.read_text() + "\nSCALE = 2.0\n")
    (problem,) = stale_units(record, tmp_path)
    assert problem.startswith("umbrella-t1: its loading code changed (preprocess.py, plugin.py")
    assert "raise the version in plugins/umbrella_t1/pyproject.toml" in problem
    # A change to the t1 plugin's questions or phantom is none of the cache's business.
    plugin = tmp_path / "plugins/umbrella_t1/umbrella_t1/plugin.py"
    loader.write_text((ROOT / "plugins/umbrella_t1/umbrella_t1/preprocess.py").read_text())
    plugin.write_text(plugin.read_text() + "\n\ndef extra_question():\n    return 'which?'\n")
    assert stale_units(record, tmp_path) == []
    # An import taken from another module, or a docstring reworded, changes no array.
    nifti = tmp_path / "umbrella_core/imaging/nifti.py"
    original = nifti.read_text()
    nifti.write_text(
        original.replace('"""', '"""Reworded. ', 1).replace(
            "from __future__ import annotations", "from __future__ import annotations\nimport os"
        )
    )
    assert stale_units(record, tmp_path) == []
    nifti.write_text(original + "\nMAX_VOXELS = 1\n")
    assert stale_units(record, tmp_path)[0].startswith("umbrella-core imaging: its loading code")
    nifti.write_text(original)
    # Once bumped, only the record is asked for.
    (problem,) = stale_units(
        record, tmp_path, version=lambda u: "9.9.9" if u == "umbrella-t1" else _unit_version(u)
    )
    assert problem.startswith("umbrella-t1: version 9.9.9: record {")


def _since_notes(folder: Path) -> list[tuple[str, str]]:
    notes = []
    for path in sorted(folder.rglob("*.py")):
        for match in re.finditer(r"\b[Ss]ince:?\s+(\d+\.\d+(?:\.\d+)?)", path.read_text()):
            notes.append((f"{path.relative_to(ROOT)}", match.group(1)))
    return notes


def test_every_since_names_a_version_the_core_has_reached():
    core = _version_tuple(umbrella_core.__version__)
    notes = _since_notes(ROOT / "umbrella_core")
    for folder in PLUGINS.values():
        notes += _since_notes(ROOT / folder)
    assert notes, "no Since notes found: the pattern no longer matches the docs"
    ahead = [f"{path}: Since {v}" for path, v in notes if _version_tuple(v) > core]
    assert not ahead, f"umbrella-core is {umbrella_core.__version__}: " + "; ".join(ahead)


@pytest.mark.parametrize("folder", sorted(PLUGINS.values()))
def test_first_party_plugins_require_a_published_core_that_exists(folder):
    requires = _pyproject(folder)["project"]["dependencies"]
    (core,) = [r for r in requires if r.startswith("umbrella-core")]
    found = re.fullmatch(r"umbrella-core>=(\d+\.\d+(?:\.\d+)?)(,<\d+(?:\.\d+)*)?", core)
    assert found, f"{folder}: {core!r} names no lower bound"
    lower = _version_tuple(found.group(1))
    assert FIRST_PUBLISHED <= lower[:2], f"{folder}: {core}: before 0.4 nothing was published"
    assert lower <= _version_tuple(umbrella_core.__version__), f"{folder}: {core}: ahead of core"


@pytest.mark.parametrize("folder", sorted(PLUGINS.values()))
def test_a_plugin_says_the_version_its_distribution_has(folder):
    package = Path(folder).name
    said = re.search(
        r'^__version__ = "(.+)"$', (ROOT / folder / package / "__init__.py").read_text(), re.M
    )
    assert said and said.group(1) == _pyproject(folder)["project"]["version"], folder


def test_the_core_says_the_version_its_distribution_has():
    assert umbrella_core.__version__ == _pyproject(".")["project"]["version"]
