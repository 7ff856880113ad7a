"""Hook implementations of the diffusion MRI plugin.

Importing this module is cheap (no torch, no nibabel): ``umbrella plugins``
imports it just to list what it provides. The loader and the phantom import
their dependencies when they are first used. The patch embedder is the core's
generic one (``umbrella_core.default_plugins.embedder``): the plugin gives none.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from umbrella_core import Augmentation, Demo, ModalitySpec, PhantomFile, hookimpl

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np


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
    """``Demo.phantom`` of ``dmri``; see :func:`umbrella_dmri.phantom.make_dmri_phantom`."""
    from umbrella_dmri.phantom import make_dmri_phantom

    return make_dmri_phantom(rng, label)


#: ``data.augment.dmri: light``: head pose and size as for T1, FA's protocol
#: dependence (RandFAScale, below) and a little noise. Both maps move alike.
LIGHT = (
    {
        "name": "RandAffine",
        "prob": 0.5,
        "rotate_range": (0.1, 0.1, 0.1),
        "scale_range": (0.05, 0.05, 0.05),
        "translate_range": (3, 3, 3),
        "padding_mode": "zeros",
    },
    {"name": "RandFAScale", "prob": 0.3, "factors": 0.05},
    {"name": "RandGaussianNoise", "prob": 0.3, "std": 0.03},
)

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
    # 64 tokens for the CPU demo.
    demo=Demo(
        phantom=phantom,
        labels=("left", "right"),
        question="Which hemisphere holds the lesion?",
        measure="What is the RAS x coordinate of the centre of the lesion, in cm?",
        measure_unit="cm",
        shape=(32, 32, 32),
        patch_size=(8, 8, 8),
    ),
    aliases=("dwi", "dti", "diffusion"),
    # A raw DWI series is fitted (dipy DTI) from the .bval/.bvec beside it.
    file_patterns=(
        "*_FA.nii.gz",
        "*_MD.nii.gz",
        "*_FA.nii",
        "*_MD.nii",
        "*_dwi.nii.gz",
        "*_dwi.nii",
    ),
    description="Diffusion MRI as FA and MD maps (2 channels), RAS, resampled, normalised per map",
    augment_presets={"light": LIGHT},
)


@hookimpl
def umbrella_modalities() -> list[ModalitySpec]:
    return [DMRI]


def _fa_scale(**arguments: Any) -> Any:
    from umbrella_dmri.augment import RandFAScale  # MONAI: imported only when used

    return RandFAScale(**arguments)


@hookimpl
def umbrella_augmentations() -> list[Augmentation]:
    return [
        Augmentation(
            name="RandFAScale",
            build=_fa_scale,
            modalities=("dmri",),
            description="FA scaled on its absolute scale (protocol, b-value, SNR), MD untouched",
        )
    ]
