"""A diffusion-specific augmentation: FA's dependence on the acquisition.

FA from the same brain differs by a few percent between protocols (b-value,
number of directions, SNR: noise inflates low FA) and scanners. The loader
keeps FA on its absolute scale (``(FA - FA_CENTRE) / FA_SCALE``), so such a
shift is visible to the model; this draws it. MD is z-scored per image by the
loader, so a global change of diffusivity is normalised away and MD is left
as it is. The background (0 in both maps) stays 0.
"""

from __future__ import annotations

from typing import Any

import torch
from monai.transforms import RandomizableTransform

from umbrella_dmri.preprocess import FA_CENTRE, FA_SCALE

__all__ = ["RandFAScale"]


class RandFAScale(RandomizableTransform):
    """With probability ``prob``, FA times a factor drawn from ``[1 - factors, 1 + factors]``.

    Applied to FA itself (not its normalised value) and clipped to [0, 1], in
    the brain (where either map is nonzero), on a ``(2, x, y, z)`` FA, MD image.
    """

    def __init__(self, prob: float = 0.1, factors: float = 0.05) -> None:
        super().__init__(prob)
        if not 0 <= factors < 1:
            raise ValueError(f"factors must be in [0, 1), got {factors}")
        self.factors = float(factors)
        self.factor = 1.0

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        self.factor = float(self.R.uniform(1 - self.factors, 1 + self.factors))

    def __call__(self, image: Any) -> Any:
        self.randomize()
        image = torch.as_tensor(image)
        if not self._do_transform:
            return image
        brain = (image != 0).any(dim=0)
        fa = (image[0] * FA_SCALE + FA_CENTRE) * self.factor
        out = image.clone()
        out[0] = torch.where(brain, (fa.clamp(0.0, 1.0) - FA_CENTRE) / FA_SCALE, image[0])
        return out
