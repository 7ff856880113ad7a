"""Helpers for testing UMBRELLA and its plugins.

* :func:`toy_modality` makes a small ModalitySpec whose loader reads NIfTI and
  whose phantom is a noisy volume with a bright half on the labelled side.
* :class:`ToyModalityPlugin` registers toy modalities and a patch embedder for them.
* :func:`fresh_plugin_manager` gives a manager with the built-ins and no
  installed entry points, so a test sees only what it registers.

Importing this module does not import torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from umbrella_core.hookspecs import hookimpl
from umbrella_core.plugins import PluginManager
from umbrella_core.types import ModalitySpec, PhantomFile

__all__ = ["toy_modality", "ToyModalityPlugin", "fresh_plugin_manager"]


def _toy_load(spec: ModalitySpec, paths: tuple[str, ...]) -> Any:
    import numpy as np

    from umbrella_core.imaging import load_nifti, resize

    channels = []
    for path in paths:
        data, _ = load_nifti(path)
        if data.ndim == spec.ndim:
            data = data[..., None]
        for c in range(data.shape[-1]):
            channels.append(resize(data[..., c], spec.shape))
    array = np.stack(channels[: spec.channels]).astype(np.float32)
    scale = float(np.abs(array).max()) or 1.0
    return array / scale


def _toy_phantom(spec: ModalitySpec, rng: Any, label: str) -> list[PhantomFile]:
    import numpy as np

    shape = spec.shape
    data = rng.normal(0.0, 0.1, size=shape).astype(np.float32)
    half = shape[0] // 2
    if label == spec.phantom_labels[0]:
        data[:half] += 1.0
    else:
        data[half:] += 1.0
    return [PhantomFile(suffix=f"c{c}", data=data, affine=np.eye(4)) for c in range(spec.channels)]


def toy_modality(
    name: str,
    *,
    ndim: int = 3,
    shape: Sequence[int] = (8, 8, 8),
    patch_size: Sequence[int] = (4, 4, 4),
    channels: int = 1,
    aliases: Sequence[str] = (),
) -> ModalitySpec:
    """A small modality for tests; the phantom's label is the brighter half along x."""
    return ModalitySpec(
        name=name,
        ndim=ndim,
        shape=shape,
        patch_size=patch_size,
        channels=channels,
        load=_toy_load,
        phantom=_toy_phantom,
        aliases=aliases,
        description=f"toy {ndim}D modality for tests",
    )


class ToyModalityPlugin:
    """A plugin object providing ``specs`` and a PatchEmbedding for each of them."""

    def __init__(self, *specs: ModalitySpec) -> None:
        self.specs = specs
        self.names = {s.name for s in specs}

    @hookimpl
    def umbrella_modalities(self) -> list[ModalitySpec]:
        return list(self.specs)

    @hookimpl
    def umbrella_patch_embedder(self, spec: ModalitySpec, hidden_size: int) -> Any:
        if spec.name not in self.names:
            return None
        from umbrella_core.model.patch import PatchEmbedding

        return PatchEmbedding(spec.channels, spec.shape, spec.patch_size, hidden_size)


def fresh_plugin_manager(*plugins: object) -> PluginManager:
    """A manager with the built-ins, no entry points, and ``plugins`` registered."""
    pm = PluginManager(load_entry_points=False)
    for i, plugin in enumerate(plugins):
        pm.register(plugin, name=f"test-plugin-{i}", distribution=f"test-dist-{i}", version="0.0")
    return pm
