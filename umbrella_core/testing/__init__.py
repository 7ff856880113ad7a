"""Helpers for testing UMBRELLA and its plugins.

* :func:`toy_modality` makes a small ModalitySpec whose loader reads NIfTI and
  whose phantom is a noisy volume with a bright half on the labelled side.
* :class:`ToyModalityPlugin` registers toy modalities and a patch embedder for them.
* :func:`fresh_plugin_manager` gives a manager with the built-ins and no
  installed entry points, so a test sees only what it registers.
* :func:`registered_hooks`, :func:`embed_and_backpropagate` and
  :func:`modules_imported_by` are the building blocks of the checks.
* ``check_*`` are the conformance checks every plugin runs on itself: a
  modality plugin's in :mod:`umbrella_core.testing.conformance`
  (:func:`check_modality_plugin` runs them all), a study reader's in
  :mod:`umbrella_core.testing.study_conformance` (:func:`check_study_reader`).
* :mod:`umbrella_core.testing.strategies` holds hypothesis strategies
  (imported on its own: hypothesis is a test dependency).
* :mod:`umbrella_core.testing.pytest_plugin` is registered as a pytest plugin
  (entry point ``pytest11``): fixtures ``umbrella_conformance``,
  ``modality_conformance``, ``umbrella_plugin_manager`` and ``umbrella_cache``.

The core's own tiny-model fixtures (look-alikes of language-model families,
tiny LLaVA checkpoints) are not part of this kit: they live in the repository's
``tests/tiny_models`` and are not installed.

Importing this package does not import torch.
"""

from __future__ import annotations

from umbrella_core.testing.conformance import (
    ConformanceError,
    check_augment_presets,
    check_entry_point,
    check_light_import,
    check_loader,
    check_modality_plugin,
    check_orientation,
    check_patch_embedder,
    check_phantom_round_trip,
    check_registration,
    check_spec,
    write_phantom,
)
from umbrella_core.testing.helpers import (
    ToyModalityPlugin,
    embed_and_backpropagate,
    fresh_plugin_manager,
    modules_imported_by,
    registered_hooks,
    toy_modality,
)
from umbrella_core.testing.study_conformance import (
    check_records,
    check_reports_bad_records,
    check_source,
    check_study_reader,
    check_study_reader_ignores_foreign,
)

__all__ = [
    "ConformanceError",
    "check_augment_presets",
    "check_entry_point",
    "check_light_import",
    "check_loader",
    "check_modality_plugin",
    "check_patch_embedder",
    "check_phantom_round_trip",
    "check_orientation",
    "check_records",
    "check_registration",
    "check_spec",
    "check_study_reader",
    "check_study_reader_ignores_foreign",
    "check_reports_bad_records",
    "check_source",
    "write_phantom",
    "toy_modality",
    "ToyModalityPlugin",
    "fresh_plugin_manager",
    "registered_hooks",
    "embed_and_backpropagate",
    "modules_imported_by",
]
