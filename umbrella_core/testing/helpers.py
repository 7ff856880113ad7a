"""The building blocks of the kit: toy modalities, a fresh plugin manager, hook and import probes.

Re-exported by :mod:`umbrella_core.testing`; the conformance checks
(:mod:`umbrella_core.testing.conformance`) import them from here, so the
package and its checks do not import each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from umbrella_core.hookspecs import hookimpl
from umbrella_core.plugins import PluginManager
from umbrella_core.types import Demo, ModalitySpec, PhantomFile

__all__ = [
    "toy_modality",
    "ToyModalityPlugin",
    "fresh_plugin_manager",
    "registered_hooks",
    "embed_and_backpropagate",
    "modules_imported_by",
    "rank_order",
]


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
    assert spec.demo is not None  # the toy modality's own phantom: it has a demo
    if label == spec.demo.labels[0]:
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
        demo=Demo(phantom=_toy_phantom),
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


class _DefaultEmbedder:
    """The built-in default patch embedder, for the modalities the plugin under test declares.

    A host asks it only for modalities in its registry; here that registry is
    the one plugin's. So a plugin that relies on the default passes the
    embedder checks, and an embedder of the plugin's own that answers for a
    name it does not declare is still caught.
    """

    def __init__(self, hook: Any) -> None:
        self.hook = hook

    @hookimpl(trylast=True)
    def umbrella_patch_embedder(self, spec: ModalitySpec, hidden_size: int) -> Any:
        declared = {s.name for result in self.hook.umbrella_modalities() for s in result or ()}
        if spec.name not in declared:
            return None
        from umbrella_core.default_plugins import embedder

        return embedder.umbrella_patch_embedder(spec=spec, hidden_size=hidden_size)


def registered_hooks(plugin: object) -> Any:
    """A bare pluggy hook relay with ``plugin`` registered and checked.

    ``check_pending`` fails when the plugin implements an ``umbrella_*``
    function that is not a hook, or asks for an argument a hook does not have.
    The built-in default patch embedder is registered too (``trylast``, and only
    for the modalities ``plugin`` declares), as a host would have it.
    """
    import pluggy

    import umbrella_core.hookspecs as hookspecs

    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(plugin)
    pm.register(_DefaultEmbedder(pm.hook))
    pm.check_pending()
    return pm.hook


def embed_and_backpropagate(
    plugin: Any, spec: ModalitySpec, *, hidden_size: int = 16, batch: int = 2
) -> tuple[Any, Any, Any]:
    """Run ``plugin``'s patch embedder for ``spec`` on random input and backpropagate.

    Asserts what the core relies on: the output is ``(batch, spec.num_tokens,
    hidden_size)`` and gradients reach the input and every parameter.

    Returns:
        ``(module, input, output)`` for further checks.
    """
    import torch

    module = plugin.umbrella_patch_embedder(spec=spec, hidden_size=hidden_size)
    assert module is not None, f"no patch embedder for {spec.name!r}"
    x = torch.randn(batch, *spec.input_shape, requires_grad=True)
    out = module(x)
    assert out.shape == (batch, spec.num_tokens, hidden_size), tuple(out.shape)
    out.sum().backward()
    assert x.grad is not None
    assert all(p.grad is not None for p in module.parameters())
    return module, x, out


def modules_imported_by(code: str, modules: Sequence[str] = ("torch", "nibabel")) -> list[str]:
    """Which of ``modules`` a fresh interpreter has imported after running ``code``.

    Plugins are imported by ``umbrella plugins``, which must stay fast: their
    module import should pull in nothing heavy.
    """
    import json
    import subprocess
    import sys

    probe = (
        f"{code}\nimport json, sys\n"
        f"print(json.dumps(sorted(m for m in {list(modules)!r} if m in sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def rank_order(
    sampler: Any, rank: int, world_size: int, batch_size: int, epoch: int | None = None
) -> Any:
    """The indices rank ``rank`` draws from an InterleavedSampler, batch after batch.

    Each global batch of ``sampler.order(epoch)`` is cut into ``world_size``
    consecutive batches, as accelerate's batch dispatch does; tests use it to
    check that ranks draw disjoint, equal shares.
    """
    import numpy as np

    order = sampler.order(epoch)
    return np.concatenate(
        [
            order[start + rank * batch_size : start + (rank + 1) * batch_size]
            for start in range(0, len(order), batch_size * world_size)
        ]
        or [np.empty(0, dtype=np.int64)]
    )
