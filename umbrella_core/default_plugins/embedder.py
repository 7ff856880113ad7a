"""The built-in patch embedder: a generic PatchEmbedding for a modality no plugin embeds.

It is ``trylast``: a modality plugin that builds its own embedder answers
first, and so does one marked ``tryfirst`` to replace another plugin's; this
one answers for every spec, so a plugin that gives only a ``ModalitySpec``
trains. :class:`~umbrella_core.model.patch.PatchEmbedding` handles 3 and 4
spatial axes: one token per patch, learned positions, no CLS token.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from umbrella_core.hookspecs import hookimpl
from umbrella_core.types import ModalitySpec

if TYPE_CHECKING:  # pragma: no cover - typing only, keeps torch out of import time
    import torch.nn as nn


@hookimpl(trylast=True)
def umbrella_patch_embedder(spec: ModalitySpec, hidden_size: int) -> nn.Module:
    from umbrella_core.model.patch import PatchEmbedding

    return PatchEmbedding(spec.channels, spec.shape, spec.patch_size, hidden_size)
