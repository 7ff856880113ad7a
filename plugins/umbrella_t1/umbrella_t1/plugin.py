"""Hook implementations of the T1 plugin.

Importing this module is cheap (no torch, no nibabel): ``umbrella plugins``
imports it just to list what it provides. The loader, the phantom and the
patch embedder import their dependencies when they are first used.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from umbrella_core import ModalitySpec, PhantomFile, hookimpl, positive_settings

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    from torch import nn


def load(spec: ModalitySpec, paths: Sequence[str]) -> Any:
    """``ModalitySpec.load`` of ``t1``; see :func:`umbrella_t1.preprocess.load_t1`."""
    from umbrella_t1.preprocess import load_t1

    return load_t1(spec, paths)


def companions(spec: ModalitySpec, paths: Sequence[str]) -> list[str]:
    """The brain mask the loader finds next to a lone T1 file (see ``find_brain_mask``)."""
    from umbrella_t1.preprocess import find_brain_mask

    mask = find_brain_mask(paths[0]) if len(paths) == 1 else None
    return [mask] if mask is not None else []


def configure(spec: ModalitySpec, settings: dict[str, Any]) -> ModalitySpec:
    """``data.preprocessing.t1``: ``spacing`` (mm, isotropic target voxel size)."""
    import attrs

    from umbrella_t1.preprocess import t1_loader

    spacing = positive_settings(spec.name, settings, ("spacing",)).get("spacing")
    return spec if spacing is None else attrs.evolve(spec, load=t1_loader(spacing))


def phantom(spec: ModalitySpec, rng: np.random.Generator, label: str) -> list[PhantomFile]:
    """``ModalitySpec.phantom`` of ``t1``; see :func:`umbrella_t1.phantom.make_t1_phantom`."""
    from umbrella_t1.phantom import make_t1_phantom

    return make_t1_phantom(rng, label)


T1 = ModalitySpec(
    name="t1",
    ndim=3,
    # 128^3 at 1.5 mm (preprocess.T1_SPACING) is a 192 mm field of view; 16^3 patches: 512 tokens.
    shape=(128, 128, 128),
    patch_size=(16, 16, 16),
    channels=1,
    load=load,
    companions=companions,
    configure=configure,
    phantom=phantom,
    phantom_labels=("left", "right"),
    phantom_question="Which hemisphere holds the lesion?",
    phantom_measure="What is the RAS x coordinate of the centre of the lesion, in cm?",
    phantom_measure_unit="cm",
    aliases=("t1w", "smri", "anat"),
    file_patterns=("*_T1w.nii.gz", "*_T1w.nii"),
    description="T1-weighted structural MRI: one 3D volume, RAS, 1.5 mm, head-centred, normalised",
    # 64 tokens: small enough for the CPU demo, large enough to see a lesion.
    demo_shape=(32, 32, 32),
    demo_patch_size=(8, 8, 8),
)


@hookimpl
def umbrella_modalities() -> list[ModalitySpec]:
    return [T1]


@hookimpl
def umbrella_patch_embedder(spec: ModalitySpec, hidden_size: int) -> nn.Module | None:
    if spec.name != T1.name:
        return None
    from umbrella_core.model.patch import PatchEmbedding

    return PatchEmbedding(spec.channels, spec.shape, spec.patch_size, hidden_size)
