"""Random augmentation of training images, per modality, with MONAI transforms (since 0.3).

Deterministic preprocessing is the modality's ``load`` (and the preprocessed
cache keeps its result); augmentation is a stage after it, drawn anew for
every sample in the DataLoader workers, as MONAI's ``CacheDataset`` pattern
does. It is configured per modality::

    data:
      augment:
        t1: [{name: RandAffine, prob: 0.5, rotate_range: 0.1}, {name: RandBiasField}]
        dmri: light                      # the modality's preset (ModalitySpec.augment_presets)
        fmri: [light, {name: RandGaussianNoise, std: 0.05}]

A name is an augmentation a plugin offers (``umbrella_augmentations``, which
win over MONAI's names) or any MONAI array transform (``monai.transforms``).
Unknown names, unknown arguments and transforms that change the image's shape
are config errors naming the key. A 4D image (x, y, z, t) is augmented with
its frames as channels, so a spatial transform moves every frame of a window
alike.

Answers that depend on the side. The first spatial axis is x (left to right:
every loader reorients to RAS), so a flip along it mirrors the brain. Each
augmentation says whether its arguments can ``mirror`` x or ``turn`` it onto
another axis (a 90° rotation). For a training record that such a transform
would touch, its laterality decides (the record's own
:attr:`~umbrella_core.types.StudyRecord.laterality`, as its reader knows the
task; else ``data.laterality.<study>``; else ``refuse`` when a turn names a
side): ``refuse`` is a config error naming the key and the record, ``swap``
swaps left and right in its turns whenever its images were mirrored,
``ignore`` lets it be (:mod:`umbrella_core.augmentation.laterality`).

Answers that depend on position or intensity. A record's ``forbid_augment``
names transforms that must not touch its images (``spatial`` stands for every
transform that moves voxels: a coordinate or a volume moves with them); they
are skipped for that record's images and applied to the others', and the
run's start says how many records skip what.

Held-out records are never augmented: only the training dataset is wrapped
(:mod:`umbrella_core.data.augmented`).
"""

from __future__ import annotations

from umbrella_core.augmentation.build import build_pipelines, run_pipelines
from umbrella_core.augmentation.values import (
    SPATIAL,
    AugmentStep,
    Pipeline,
    fold,
    unfold,
)

__all__ = [
    "AugmentStep",
    "Pipeline",
    "build_pipelines",
    "run_pipelines",
    "fold",
    "unfold",
    "SPATIAL",
]
