"""What takes the vision tower's patch-embedding slot: one embedder per active modality."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from umbrella_core.errors import TokenCountError
from umbrella_core.types import ModalitySpec

__all__ = ["ModalityEmbeddings"]


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
