"""Fixtures of the umbrella-studies tests: a fresh plugin manager and a tiny NIfTI writer."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from umbrella_core.plugins import PluginManager


@pytest.fixture
def pm() -> PluginManager:
    """A manager with the built-ins and this plugin only (no installed entry points)."""
    import umbrella_studies.plugin as plugin

    manager = PluginManager(load_entry_points=False)
    manager.register(plugin, name="studies", distribution="umbrella-studies", version="0.1.0")
    return manager


@pytest.fixture
def nifti() -> Callable[..., Path]:
    """``nifti(path, shape=(4, 4, 4))`` writes a tiny zero image and returns its path."""
    import nibabel as nib
    import numpy as np

    def write(path: Path, shape: tuple[int, ...] = (4, 4, 4)) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(np.zeros(shape, dtype=np.float32), np.eye(4)), str(path))
        return path

    return write


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def text() -> Callable[[Path, str], Path]:
    """``text(path, content)`` writes a text file (parents created)."""
    return write


@pytest.fixture
def jsonfile() -> Callable[[Path, object], Path]:
    """``jsonfile(path, obj)`` writes a JSON file (parents created)."""
    return lambda path, obj: write(path, json.dumps(obj))
