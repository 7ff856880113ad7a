"""The README's modality plugin example is code a newcomer copies: it must pass the kit."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

from umbrella_core.testing import ConformanceError, check_modality_plugin

ROOT = Path(__file__).resolve().parents[1]


def _block(text: str, first_line: str) -> str:
    """The fenced Python block of ``text`` that starts with ``first_line``."""
    for block in re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL):
        if block.startswith(first_line + "\n"):
            return block
    raise AssertionError(f"no ```python block starting with {first_line!r}")


def test_the_readme_pet_plugin_passes_the_conformance_kit(tmp_path, monkeypatch):
    code = _block((ROOT / "README.md").read_text(), "# my_pet/plugin.py")
    # The kit imports it in a fresh interpreter too (nothing heavy at import).
    plugin = _package(tmp_path, monkeypatch, "my_pet", code)

    (spec,) = check_modality_plugin(plugin, tmp_path / "kit")
    assert spec.name == "pet" and spec.num_tokens == 64  # its demo geometry: 32^3 in 8^3 patches


def _package(tmp_path, monkeypatch, name: str, code: str):
    package = tmp_path / "src" / name
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "plugin.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "src"))
    return importlib.import_module(f"{name}.plugin")


def test_the_kit_catches_the_mistakes_the_example_once_had(tmp_path, monkeypatch):
    code = _block((ROOT / "README.md").read_text(), "# my_pet/plugin.py")
    one_side = code.replace('slice(0, 16) if label == "left" else slice(16, 32)', "slice(0, 16)")
    assert one_side != code
    plugin = _package(tmp_path, monkeypatch, "same_pet", one_side)
    with pytest.raises(ConformanceError, match="load to the same input"):
        check_modality_plugin(plugin, tmp_path / "kit")
    plugin = _package(tmp_path, monkeypatch, "heavy_pet", "import umbrella_core.imaging\n" + code)
    with pytest.raises(ConformanceError, match="imports nibabel"):
        check_modality_plugin(plugin, tmp_path / "kit2")


@pytest.mark.parametrize("doc", ["README.md", "docs/PLUGINS.md"])
def test_the_pyproject_examples_are_what_pip_installs(doc):
    """A plugin's pyproject.toml copied from the docs must build: pip needs a build backend
    and a version, and the core version the plugin needs belongs in its requirement."""
    import tomllib

    text = (ROOT / doc).read_text()
    blocks = re.findall(r"```toml\n(# pyproject\.toml\n.*?)```", text, re.S)
    assert blocks, f"{doc}: no pyproject.toml example"
    for block in blocks:
        project = tomllib.loads(block)
        assert project["build-system"]["build-backend"] and project["build-system"]["requires"]
        assert project["project"]["version"]
        (core,) = [d for d in project["project"]["dependencies"] if d.startswith("umbrella-core")]
        assert ">=" in core, f"{doc}: {core!r}: say which core the plugin needs"
        assert project["project"]["entry-points"]["umbrella"]
