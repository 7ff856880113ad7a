"""The values plugins give and get, one module per hook family.

``modality`` (``umbrella_modalities``), ``records`` (``umbrella_study_reader``),
``loss`` (``umbrella_loss_terms``), ``metrics`` (``umbrella_metrics``),
``baselines`` (``umbrella_baselines``), ``augmentation``
(``umbrella_augmentations``), ``commands`` (``umbrella_commands``), and ``batch``:
what the collator gives the model and the loss terms. Plain attrs classes and a
TypedDict: importing them imports neither torch nor numpy, so that ``import
umbrella_core`` and ``umbrella plugins`` stay fast.
"""

from __future__ import annotations

from umbrella_core.types.augmentation import Augmentation
from umbrella_core.types.baselines import Baseline
from umbrella_core.types.batch import Batch
from umbrella_core.types.commands import Command
from umbrella_core.types.loss import LossTerm
from umbrella_core.types.metrics import MetricFamily, QuestionAnswers
from umbrella_core.types.modality import Demo, ModalitySpec, PhantomFile, Windows, positive_settings
from umbrella_core.types.records import IMAGE_PLACEHOLDER, ImageRef, StudyRecord, Turn

__all__ = [
    "Augmentation",
    "Baseline",
    "Batch",
    "Command",
    "Demo",
    "IMAGE_PLACEHOLDER",
    "ImageRef",
    "LossTerm",
    "MetricFamily",
    "ModalitySpec",
    "PhantomFile",
    "QuestionAnswers",
    "StudyRecord",
    "Turn",
    "Windows",
    "positive_settings",
]
