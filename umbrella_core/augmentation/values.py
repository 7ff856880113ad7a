"""What a run makes of augmentations: a configured step, a modality's pipeline."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import attrs

__all__ = ["AugmentStep", "Pipeline", "fold", "unfold", "SPATIAL"]

#: In a record's ``forbid_augment``: every transform that moves voxels.
SPATIAL = "spatial"


@attrs.frozen
class AugmentStep:
    """One configured transform: where it was configured, what it is, its instance."""

    key: str
    name: str
    arguments: Mapping[str, Any]
    sides: str
    transform: Any = attrs.field(eq=False, repr=False)
    mirrored: Callable[[Any], bool] | None = attrs.field(default=None, eq=False, repr=False)
    spatial: bool = False

    def forbidden_by(self, forbid: Collection[str]) -> bool:
        """Whether a record's ``forbid_augment`` names this step (``spatial``: a spatial one)."""
        return self.name in forbid or (self.spatial and SPATIAL in forbid)


@attrs.frozen
class Pipeline:
    """A modality's augmentation: its steps in order; frames fold into channels when 4D."""

    modality: str
    steps: tuple[AugmentStep, ...]
    frames_as_channels: bool = False

    @property
    def can_mirror(self) -> bool:
        return any(step.sides != "keep" for step in self.steps)

    def apply(
        self, image: Any, seed: Sequence[int], forbid: Collection[str] = ()
    ) -> tuple[Any, bool]:
        """``(augmented image, whether x ended up mirrored)`` for one image.

        Step ``k`` draws from ``SeedSequence([*seed, k])`` (its MONAI random
        state and torch's generator, restored afterwards): the same seed gives
        the same image in any process, whatever ran before, and changing one
        step's arguments, or skipping it, leaves the other steps' draws as they
        were. Steps that ``forbid`` (a record's ``forbid_augment``) names are skipped.
        """
        import numpy as np
        import torch

        x = fold(image) if self.frames_as_channels else image
        mirrored = False
        for number, step in enumerate(self.steps):
            if forbid and step.forbidden_by(forbid):
                continue
            state = int(np.random.SeedSequence([*seed, number]).generate_state(1)[0])
            transform = step.transform
            if hasattr(transform, "set_random_state"):
                transform.set_random_state(seed=state)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(state)
                out = transform(x)
            if step.sides == "mirror":
                # Two mirrors undo each other.
                mirrored ^= bool(step.mirrored(transform)) if step.mirrored else True
            x = plain_tensor(out)
        return (unfold(x, image.shape) if self.frames_as_channels else x), mirrored


def fold(image: Any) -> Any:
    """``(c, x, y, z, t)`` to ``(c * t, x, y, z)``: frames as channels, moved alike."""
    c, *spatial, t = image.shape
    return image.permute(0, 4, 1, 2, 3).reshape(c * t, *spatial)


def unfold(image: Any, shape: Sequence[int]) -> Any:
    """:func:`fold` undone, to ``shape`` ``(c, x, y, z, t)``."""
    c, *spatial, t = shape
    return image.reshape(c, t, *spatial).permute(0, 2, 3, 4, 1).contiguous()


def plain_tensor(out: Any) -> Any:
    """A float32, contiguous torch tensor (MONAI returns MetaTensors, some numpy arrays)."""
    import torch

    if hasattr(out, "as_tensor"):
        out = out.as_tensor()
    return torch.as_tensor(out, dtype=torch.float32).contiguous()
