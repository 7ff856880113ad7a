"""What takes the vision tower's patch-embedding slot: one embedder per active modality.

:func:`probe_embedder` checks that what a plugin gives fits the slot, before a
model is built from it.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from umbrella_core.errors import PluginError, TokenCountError
from umbrella_core.types import ModalitySpec

__all__ = ["ModalityEmbeddings", "probe_embedder"]


def probe_embedder(module: object, spec: ModalitySpec, hidden_size: int, *, who: str) -> nn.Module:
    """``module``, checked to fit the slot before a model is built from it.

    It must be an ``nn.Module`` whose output for one zero input is ``(1,
    spec.num_tokens, hidden_size)``: a wrong embedder is refused at start-up,
    naming the plugin, rather than at step 1. Parameters already partitioned by
    DeepSpeed ZeRO-3 are not probed (a forward there would need the engine).

    Args:
        module: What a plugin's ``umbrella_patch_embedder`` returned.
        spec: The modality, at the run's geometry.
        hidden_size: The width the tokens must have.
        who: The plugin, as error messages name it.

    Raises:
        PluginError: not a module, fails on the input, or gives the wrong shape.
    """
    if not isinstance(module, nn.Module):
        raise PluginError(
            f"{who}: umbrella_patch_embedder for {spec.name!r} returned "
            f"{type(module).__name__}, expected torch.nn.Module; fix the plugin"
        )
    params = list(module.parameters())
    if any(hasattr(p, "ds_id") for p in params):
        return module
    device = params[0].device if params else torch.device("cpu")
    dtype = params[0].dtype if params and params[0].is_floating_point() else torch.float32
    expected = (1, spec.num_tokens, hidden_size)
    try:
        with torch.no_grad():
            out = module(torch.zeros((1, *spec.input_shape), device=device, dtype=dtype))
    except Exception as exc:
        raise PluginError(
            f"{who}: the patch embedder for {spec.name!r} fails on an input of shape "
            f"{(1, *spec.input_shape)}: {type(exc).__name__}: {exc}; fix the plugin"
        ) from exc
    shape = tuple(getattr(out, "shape", ()))
    if shape != expected:
        raise PluginError(
            f"{who}: the patch embedder for {spec.name!r} gives output of shape {shape} "
            f"for an input of shape {(1, *spec.input_shape)}, expected {expected} "
            f"(batch, spec.num_tokens, hidden_size); fix the plugin's embedder"
        )
    return module


class ModalityEmbeddings(nn.Module):
    """Holds the patch embedder of every active modality, dispatched by name (I2).

    ``order`` is the canonical modality order: every rank runs the embedders in
    it, every step (I4).
    """

    def __init__(
        self, specs: Mapping[str, ModalitySpec], embedders: Mapping[str, nn.Module]
    ) -> None:
        super().__init__()
        self.order = tuple(specs)
        self.specs = dict(specs)
        self.embedders = nn.ModuleDict({name: embedders[name] for name in self.order})

    def embed(self, modality: str, pixel_values: torch.Tensor) -> torch.Tensor:
        """Tokens ``(B, N, D)`` for a stack of images of ``modality``; N is checked (I3)."""
        if modality not in self.embedders:
            raise KeyError(f"modality {modality!r} is not active; active: {', '.join(self.order)}")
        spec = self.specs[modality]
        tokens = self.embedders[modality](pixel_values)
        if tokens.dim() != 3 or tokens.shape[1] != spec.num_tokens:
            raise TokenCountError(
                f"the {modality} patch embedder returned shape {tuple(tokens.shape)}; expected "
                f"(batch, {spec.num_tokens}, hidden) for shape {spec.shape} and patch size "
                f"{spec.patch_size}"
            )
        return tokens

    def forward(self, *args: object, **kwargs: object) -> torch.Tensor:
        raise RuntimeError(
            "ModalityEmbeddings needs the modality name: call embed(modality, pixel_values); "
            "UmbrellaModel does this for you"
        )
