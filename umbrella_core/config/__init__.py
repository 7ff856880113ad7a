"""Run configuration: attrs classes, loaded from YAML with command-line overrides.

Every setting has a default, so ``umbrella train`` runs with none. A YAML file
(``--config run.yaml``) sets any subset; ``--set section.key=value`` and the
dedicated flags override it. Unknown keys and wrong types are errors naming the
key, e.g. ``trainer.learning_rate: expected float, got 'fast'``.

``settings`` holds the classes (and the learning rate a run chooses), ``checks``
their validators and converters, ``files`` the YAML read (duplicate keys
refused) and the overrides applied, ``loading`` the checked structuring.
"""

from __future__ import annotations

from umbrella_core.config.loading import load_config, structure
from umbrella_core.config.settings import (
    PRETRAINED_LEARNING_RATE,
    RANDOM_START_LEARNING_RATE,
    DataConfig,
    LoraConfig,
    ModelConfig,
    RunConfig,
    SplitConfig,
    StudyConfig,
    TrainerConfig,
    chosen_learning_rate,
    learning_rate,
)

__all__ = [
    "StudyConfig",
    "SplitConfig",
    "LoraConfig",
    "ModelConfig",
    "DataConfig",
    "TrainerConfig",
    "RunConfig",
    "load_config",
    "structure",
    "RANDOM_START_LEARNING_RATE",
    "PRETRAINED_LEARNING_RATE",
    "learning_rate",
    "chosen_learning_rate",
]
