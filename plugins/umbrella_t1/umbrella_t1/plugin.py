"""Hook implementations of the T1 plugin.

Importing this module is cheap (no torch, no nibabel): ``umbrella plugins``
imports it just to list what it provides. The loader and the phantom import
their dependencies when they are first used. The patch embedder is the core's
generic one (``umbrella_core.default_plugins.embedder``): the plugin gives none.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from umbrella_core import Demo, ModalitySpec, PhantomFile, hookimpl, positive_settings

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np


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
    """``Demo.phantom`` of ``t1``; see :func:`umbrella_t1.phantom.make_t1_phantom`."""
    from umbrella_t1.phantom import make_t1_phantom

    return make_t1_phantom(rng, label)


#: ``data.augment.t1: light``: head pose and size (5.7°, 5 %, 3 voxels) as
#: positioning varies, scanner bias field, contrast and noise. No flip: the
#: hemispheres are not interchangeable (see umbrella_core.augmentation).
LIGHT = (
    {
        "name": "RandAffine",
        "prob": 0.5,
        "rotate_range": (0.1, 0.1, 0.1),
        "scale_range": (0.05, 0.05, 0.05),
        "translate_range": (3, 3, 3),
        "padding_mode": "border",
    },
    {"name": "RandBiasField", "prob": 0.3, "coeff_range": (0.0, 0.1)},
    {"name": "RandAdjustContrast", "prob": 0.3, "gamma": (0.8, 1.25)},
    {"name": "RandGaussianNoise", "prob": 0.3, "std": 0.05},
)

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
    # 64 tokens: small enough for the CPU demo, large enough to see a lesion.
    demo=Demo(
        phantom=phantom,
        labels=("left", "right"),
        question="Which hemisphere holds the lesion?",
        measure="What is the RAS x coordinate of the centre of the lesion, in cm?",
        measure_unit="cm",
        shape=(32, 32, 32),
        patch_size=(8, 8, 8),
    ),
    aliases=("t1w", "smri", "anat"),
    file_patterns=("*_T1w.nii.gz", "*_T1w.nii"),
    description="T1-weighted structural MRI: one 3D volume, RAS, 1.5 mm, head-centred, normalised",
    augment_presets={"light": LIGHT},
)


@hookimpl
def umbrella_modalities() -> list[ModalitySpec]:
    return [T1]
