"""UMBRELLA: train LLaVA-style vision-language models on brain MRI.

Plugins import what they need from here::

    from umbrella_core import hookimpl, ModalitySpec

Importing this package loads neither torch nor any plugin.
"""

from __future__ import annotations

from umbrella_core.constants import CORE_VERSION, IGNORE_INDEX
from umbrella_core.errors import (
    ConfigError,
    DataError,
    DuplicateNameError,
    ModelError,
    PluginError,
    TokenCountError,
    UmbrellaError,
)
from umbrella_core.hookspecs import hookimpl
from umbrella_core.types import (
    IMAGE_PLACEHOLDER,
    Augmentation,
    Baseline,
    Batch,
    Command,
    Demo,
    ImageRef,
    LossTerm,
    MetricFamily,
    ModalitySpec,
    PhantomFile,
    QuestionAnswers,
    StudyRecord,
    Turn,
    Windows,
    positive_settings,
)

__version__ = CORE_VERSION

__all__ = [
    "hookimpl",
    "ModalitySpec",
    "Demo",
    "Windows",
    "PhantomFile",
    "ImageRef",
    "Turn",
    "StudyRecord",
    "LossTerm",
    "MetricFamily",
    "QuestionAnswers",
    "Baseline",
    "Command",
    "Augmentation",
    "IMAGE_PLACEHOLDER",
    "IGNORE_INDEX",
    "Batch",
    "positive_settings",
    "UmbrellaError",
    "PluginError",
    "DuplicateNameError",
    "ConfigError",
    "DataError",
    "ModelError",
    "TokenCountError",
    "__version__",
]
