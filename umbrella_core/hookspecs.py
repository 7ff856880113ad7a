"""The UMBRELLA plugin API.

Every hook a plugin may implement is declared here, typed and documented.
A plugin is a module (or object) with functions named like these hooks and
decorated with :data:`umbrella_core.hookimpl`; it is registered through the
``umbrella`` entry-point group::

    [project.entry-points.umbrella]
    t1 = "umbrella_t1.plugin"

A hook implementation may accept any subset of a hook's arguments. An
implementation whose name starts with ``umbrella_`` but is not declared here,
or that asks for an argument the hook does not have, is reported at start-up
(see :meth:`umbrella_core.plugins.PluginManager.check`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:  # pragma: no cover - typing only, keeps torch out of import time
    import torch.nn as nn

    from umbrella_core.types import LossTerm, MetricFamily, ModalitySpec, StudyRecord

PROJECT = "umbrella"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# ---------------------------------------------------------------------------
# Modalities
# ---------------------------------------------------------------------------


@hookspec
def umbrella_modalities() -> Iterable[ModalitySpec]:
    """Declare the imaging modalities this plugin provides.

    Returns:
        ModalitySpec values. Each name and alias must be unique across all
        installed plugins; a clash is an error naming both distributions.

    Called once per plugin manager; every implementation is called.

    Since: 0.1
    """


# ---------------------------------------------------------------------------
# Patch embedders
# ---------------------------------------------------------------------------


@hookspec(firstresult=True)
def umbrella_patch_embedder(spec: ModalitySpec, hidden_size: int) -> nn.Module | None:
    """Build the patch embedder of one modality.

    Args:
        spec: The modality, with the shape and patch size configured for this run.
        hidden_size: Width of the vision tower the tokens feed.

    Returns:
        An ``nn.Module`` mapping ``(B, channels, *spec.shape)`` to
        ``(B, spec.num_tokens, hidden_size)``, position information included and
        no CLS token; or None when the plugin does not embed ``spec.name``.

    First result: stops at the first non-None result, so a plugin marked
    ``tryfirst=True`` can replace a modality's embedder without touching it.

    Since: 0.1
    """


# ---------------------------------------------------------------------------
# Study readers
# ---------------------------------------------------------------------------


@hookspec(firstresult=True)
def umbrella_study_reader(
    location: str, options: Mapping[str, Any]
) -> Iterable[StudyRecord] | None:
    """Read a study: a folder, a manifest file, or anything a plugin recognises.

    Args:
        location: What the user gave to ``--study``/``--data`` (a path, possibly
            with a ``kind:`` prefix such as ``bids:/data/ds000001``).
        options: The study's settings from the run configuration (for example
            ``{"tasks": ["sex", "age"]}``): everything but ``location`` and
            ``weight``; empty when none were given. (Since 0.2.)

    Returns:
        An iterable of StudyRecord (a generator is fine; it is consumed once),
        or None when the location is not of this plugin's kind. Recognition
        must be cheap and must not raise for foreign locations.

    First result: stops at the first non-None result. Built-in readers are
    ``trylast`` so that third-party readers win.

    Since: 0.1
    """


# ---------------------------------------------------------------------------
# Loss terms
# ---------------------------------------------------------------------------


@hookspec
def umbrella_loss_terms(
    modalities: tuple[str, ...], settings: dict[str, Any]
) -> Iterable[LossTerm]:
    """Add terms to the unified next-token loss.

    Args:
        modalities: Names of the modalities active in this run, in canonical order.
        settings: The ``loss`` section of the run configuration (plugin-specific keys).

    Returns:
        LossTerm values (possibly none). The unified NLL is always present; these
        are added to it with their weights and logged separately. A term reads
        the model's output (NLL, per-position ``token_loss``, image features);
        full-vocabulary ``logits`` are there only if the term sets
        ``needs_logits`` (they are costly: see :class:`LossTerm`). (Since 0.2.)

    Every implementation is called.

    Since: 0.1
    """


# ---------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------


@hookspec
def umbrella_metrics(settings: dict[str, Any]) -> Iterable[MetricFamily]:
    """Score held-out questions: metric families for the tasks a plugin knows.

    Args:
        settings: The ``evaluation`` section of the run configuration
            (plugin-specific keys; empty by default).

    Returns:
        MetricFamily values (possibly none). Each held-out question is scored
        by the first family whose ``applies(question, answers)`` accepts it,
        in pluggy's call order: a study plugin's family for its clinical
        rating scale comes before the built-in ``categorical`` (accuracy,
        balanced accuracy, macro-F1, confusion matrix, AUROC from the
        candidates' probabilities), ``numeric`` (MAE, RMSE, Pearson r, R²,
        share unparsed) and ``text`` (BLEU, ROUGE-L, exact match) families,
        which are ``trylast``. A family says how it wants the model's answers
        (``scoring``): the probability of every candidate answer, or greedy
        decoding.

    Every implementation is called.

    Since: 0.3
    """
