"""Hook implementations of the diffusion MRI plugin.

Importing this module is cheap (no torch, no nibabel): ``umbrella plugins``
imports it just to list what it provides. The loader, the phantom and the
patch embedder import their dependencies when they are first used.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from umbrella_core import ModalitySpec, PhantomFile, hookimpl

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    from torch import nn


def load(spec: ModalitySpec, paths: Sequence[str]) -> Any:
    """``ModalitySpec.load`` of ``dmri``; see :func:`umbrella_dmri.preprocess.load_dmri`."""
    from umbrella_dmri.preprocess import load_dmri

    return load_dmri(spec, paths)


def companions(spec: ModalitySpec, paths: Sequence[str]) -> list[str]:
    """The ``.bval``/``.bvec`` the loader finds next to a lone DWI series."""
    from umbrella_dmri.dwi import find_gradients

    if len(paths) != 1:
        return []
    return [path for path in find_gradients(paths[0]) if path is not None]


def phantom(spec: ModalitySpec, rng: np.random.Generator, label: str) -> list[PhantomFile]:
    """``ModalitySpec.phantom`` of ``dmri``; see :func:`umbrella_dmri.phantom.make_dmri_phantom`."""
    from umbrella_dmri.phantom import make_dmri_phantom

    return make_dmri_phantom(rng, label)


DMRI = ModalitySpec(
    name="dmri",
    ndim=3,
    # Diffusion data is acquired at about 2 mm: 96^3 keeps that resolution over
    # a 19 cm field of view; 16^3 patches give 216 tokens.
    shape=(96, 96, 96),
    patch_size=(16, 16, 16),
    # Channel 0 is fractional anisotropy (FA), channel 1 mean diffusivity (MD).
    channels=2,
    load=load,
    companions=companions,
    phantom=phantom,
    phantom_labels=("left", "right"),
    phantom_question="Which hemisphere holds the lesion?",
    phantom_measure="What is the RAS x coordinate of the centre of the lesion, in cm?",
    phantom_measure_unit="cm",
    aliases=("dwi", "dti", "diffusion"),
    file_patterns=("*_FA.nii.gz", "*_MD.nii.gz", "*_FA.nii", "*_MD.nii"),
    description="Diffusion MRI as FA and MD maps (2 channels), RAS, resampled, normalised per map",
    # 64 tokens for the CPU demo.
    demo_shape=(32, 32, 32),
    demo_patch_size=(8, 8, 8),
)


@hookimpl
def umbrella_modalities() -> list[ModalitySpec]:
    return [DMRI]


@hookimpl
def umbrella_patch_embedder(spec: ModalitySpec, hidden_size: int) -> nn.Module | None:
    if spec.name != DMRI.name:
        return None
    from umbrella_core.model.patch import PatchEmbedding

    return PatchEmbedding(spec.channels, spec.shape, spec.patch_size, hidden_size)
