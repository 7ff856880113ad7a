"""A generic patch embedding for 3D volumes and 4D series.

The built-in default embedder (:mod:`umbrella_core.default_plugins.embedder`)
builds :class:`PatchEmbedding` with each modality's channel count, shape and
patch size when the modality's plugin gives no embedder of its own; a plugin
may build it too (with ``norm=True``, say). The module holds nothing
modality-specific.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import cast

import torch
from torch import nn

__all__ = ["PatchEmbedding", "patchify"]


def patchify(x: torch.Tensor, patch_size: Sequence[int]) -> torch.Tensor:
    """Cut ``(B, C, *dims)`` into non-overlapping patches, flattened.

    Patches are ordered with the first spatial axis slowest (as
    ``Conv3d(...).flatten(2)`` orders them); each patch's features are ordered
    ``(C, p0, p1, ...)``, the layout of a convolution kernel, so a linear layer on
    the result equals a convolution with ``kernel_size = stride = patch_size``.

    Args:
        x: Tensor of shape ``(B, C, d0, d1, ...)``, each ``di`` divisible by ``patch_size[i]``.
        patch_size: Patch size per spatial axis.

    Returns:
        Tensor of shape ``(B, prod(di // pi), C * prod(pi))``.
    """
    patch = tuple(int(p) for p in patch_size)
    n = len(patch)
    if x.dim() != n + 2:
        raise ValueError(
            f"patchify: expected a {n + 2}D tensor (B, C, {n} dims), got {tuple(x.shape)}"
        )
    batch, channels, *dims = x.shape
    if any(d % p for d, p in zip(dims, patch, strict=False)):
        raise ValueError(f"patchify: dims {tuple(dims)} are not divisible by patch size {patch}")
    grid = [d // p for d, p in zip(dims, patch, strict=False)]
    split: list[int] = []
    for g, p in zip(grid, patch, strict=False):
        split += [g, p]
    x = x.reshape(batch, channels, *split)
    # (B, C, g0, p0, g1, p1, ...) -> (B, g0, g1, ..., C, p0, p1, ...)
    order = [0, *range(2, 2 + 2 * n, 2), 1, *range(3, 3 + 2 * n, 2)]
    x = x.permute(*order)
    return x.reshape(batch, math.prod(grid), channels * math.prod(patch))


class PatchEmbedding(nn.Module):
    """Turn ``(B, C, *shape)`` into ``(B, N, hidden_size)`` tokens, with positions.

    ``N = prod(shape[i] // patch_size[i])``; there is no CLS token, so a LLaVA
    placeholder expands to exactly ``N`` tokens. Three spatial axes use a strided
    ``Conv3d``; four (``x, y, z, t``), for which torch has no convolution, use
    :func:`patchify` followed by ``nn.Linear``, which is the same operation.

    Learned position embeddings (truncated normal, std 0.02, as in ViT) are
    added to the projected patches.

    ``norm=True`` puts a LayerNorm after the projection. It is off by default:
    the vision body's transformer layers normalise their inputs (pre-LN; CLIP
    also has a LayerNorm before its first layer), and on the demo phantoms a
    per-token LayerNorm made a linear probe on the tokens generalise worse (it
    discards each patch's overall intensity, which is what a lesion changes).
    Turn it on for a vision body
    that does not normalise its input.

    Args:
        in_channels: Channels per image.
        shape: Input shape per channel (3 or 4 entries).
        patch_size: Patch size per axis; ``shape`` must be divisible by it.
        hidden_size: Token width.
        norm: Whether to apply a LayerNorm to the projected patches (see above).
    """

    def __init__(
        self,
        in_channels: int,
        shape: Sequence[int],
        patch_size: Sequence[int],
        hidden_size: int,
        *,
        norm: bool = False,
    ) -> None:
        super().__init__()
        self.in_channels = int(in_channels)
        self.shape = tuple(int(s) for s in shape)
        self.patch_size = tuple(int(p) for p in patch_size)
        self.hidden_size = int(hidden_size)
        if len(self.shape) not in (3, 4) or len(self.patch_size) != len(self.shape):
            raise ValueError(
                f"PatchEmbedding: shape {self.shape} and patch_size {self.patch_size} must both "
                "have 3 or 4 entries"
            )
        if any(p <= 0 or s % p for s, p in zip(self.shape, self.patch_size, strict=False)):
            raise ValueError(
                f"PatchEmbedding: shape {self.shape} is not divisible by "
                f"patch_size {self.patch_size}"
            )
        if self.in_channels <= 0 or self.hidden_size <= 0:
            raise ValueError("PatchEmbedding: in_channels and hidden_size must be positive")
        self.grid = tuple(s // p for s, p in zip(self.shape, self.patch_size, strict=False))
        self.num_tokens = math.prod(self.grid)
        if len(self.shape) == 3:
            # 3 entries, as shape has (checked above).
            kernel = cast("tuple[int, int, int]", self.patch_size)
            self.proj: nn.Module = nn.Conv3d(
                self.in_channels, self.hidden_size, kernel, stride=kernel
            )
        else:
            self.proj = nn.Linear(self.in_channels * math.prod(self.patch_size), self.hidden_size)
        self.norm: nn.Module = nn.LayerNorm(self.hidden_size) if norm else nn.Identity()
        self.position = nn.Parameter(torch.zeros(1, self.num_tokens, self.hidden_size))
        nn.init.trunc_normal_(self.position, std=0.02)

    @property
    def expected_input_shape(self) -> tuple[int, ...]:
        """``(C, *shape)``: one image as this module expects it, without the batch axis."""
        return (self.in_channels, *self.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed a batch: ``(B, C, *shape)`` -> ``(B, num_tokens, hidden_size)``."""
        if x.dim() != len(self.shape) + 2 or tuple(x.shape[1:]) != self.expected_input_shape:
            expected = ", ".join(map(str, self.expected_input_shape))
            raise ValueError(
                f"PatchEmbedding: expected input (B, {expected}), got {tuple(x.shape)}"
            )
        if isinstance(self.proj, nn.Conv3d):
            tokens = self.proj(x).flatten(2).transpose(1, 2)
        else:
            tokens = self.proj(patchify(x, self.patch_size))
        return self.norm(tokens) + self.position

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, shape={self.shape}, patch_size={self.patch_size}, "
            f"hidden_size={self.hidden_size}, num_tokens={self.num_tokens}"
        )
