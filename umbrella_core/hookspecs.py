# Hookspecs are declarations: pluggy never calls their bodies, which hold only the
# docstring, so the "missing return" of a non-None hook is not an error here.
# mypy: disable-error-code="empty-body"
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

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:  # pragma: no cover - typing only, keeps torch out of import time
    import torch.nn as nn

    from umbrella_core.errors import DataError
    from umbrella_core.types import (
        Augmentation,
        Baseline,
        Command,
        LossTerm,
        MetricFamily,
        ModalitySpec,
        StudyRecord,
    )

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
    location: str, options: Mapping[str, Any], on_error: Callable[[DataError], None]
) -> Iterable[StudyRecord] | None:
    """Read a study: a folder, a manifest file, or anything a plugin recognises.

    Args:
        location: What the user gave to ``--study``/``--data`` (a path, possibly
            with a ``kind:`` prefix such as ``bids:/data/ds000001``).
        options: The study's settings from the run configuration (for example
            ``{"tasks": ["sex", "age"]}``): everything but ``location`` and
            ``weight``; empty when none were given. (Since 0.2.)
        on_error: Call it with a :class:`~umbrella_core.errors.DataError`
            for each record that cannot be used (a bad line, a missing
            field, a phenotype that does not parse) and go on with the next
            record. Give the error ``source`` (the record's
            ``StudyRecord.source``, or the line or row at fault when no record
            could be made) and ``field``. ``umbrella validate`` then lists
            every bad record, and ``data.on_bad=skip`` trains without them;
            a caller that wants the first error to stop reading passes an
            ``on_error`` that raises it. A problem with the whole study (no
            such folder, an unreadable table) is raised, not reported.
            Optional: a reader that does not take it raises instead, and
            its first bad record ends the study. (Since 0.3.)

    Returns:
        An iterable of StudyRecord (a generator is fine; it is consumed once),
        or None when the location is not of this plugin's kind. Recognition
        must be cheap and must not raise for foreign locations.

    Each record's ``source`` says where it came from (``FILE:LINE``, a table
    row, the scan's file); records may share one (several task records of
    one scan). It is what problems, ``bad_samples.json`` and the
    non-finite-loss report name, so make it a place a user can open.

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


# ---------------------------------------------------------------------------
# Baselines
# ---------------------------------------------------------------------------


@hookspec
def umbrella_baselines() -> Iterable[Baseline]:
    """Offer simple image representations for the baseline shown beside every figure.

    The held-out table of a run (``umbrella train``'s at the end, ``umbrella
    evaluate``'s) shows, beside each of the VLM's figures, the same metrics of
    a linear model (logistic regression for categorical questions, ridge
    regression for numeric ones) fitted on the training split's features,
    with its regularisation chosen on the validation split
    (:mod:`umbrella_core.evaluation.baselines`; ``evaluation.baselines:
    auto|on|off``).

    A hook of its own rather than part of ``umbrella_metrics``: a baseline is
    about how an *image* is represented, per modality (regional means of a
    T1, the connectivity of an fMRI series, a plugin's atlas), while a metric
    family is about how a question's *answers* are scored. One modality
    plugin's representation then serves every study's questions, and one
    study plugin's metric family scores the baseline's answers as it scores
    the VLM's.

    Returns:
        Baseline values (possibly none): a name, a description, ``applies(spec)``
        (which modality specs it represents) and ``features(spec, image)``
        (one image as a 1-D numpy array). For each modality key and question
        the first baseline that applies to every image's spec is used, in
        pluggy's call order: a plugin's before the built-in ``regional`` one
        (regional means of 3D images, regional connectivity of 4D series),
        which is ``trylast``. A name two plugins give is refused, naming both;
        ``umbrella plugins`` lists them.

    Every implementation is called.

    Since: 0.4
    """


# ---------------------------------------------------------------------------
# Augmentation
# ---------------------------------------------------------------------------


@hookspec
def umbrella_augmentations() -> Iterable[Augmentation]:
    """Offer augmentations of a plugin's own, by name, for ``data.augment`` lists.

    Returns:
        Augmentation values (possibly none): a name, ``build(**arguments)``
        giving the transform (a callable on a ``(channels, x, y, z)`` float32
        tensor, best a MONAI ``Randomizable`` so each sample's draw comes from
        its own seed), the modalities it is for, and whether it can mirror or
        turn the left-right axis (``sides``, with ``mirrored`` telling after a
        call), so that answers naming a side are protected
        (:mod:`umbrella_core.augmentation`). A name given by two plugins is
        refused, naming both; a plugin's name wins over a MONAI transform's.
        ``umbrella plugins`` lists them.

    Every implementation is called.

    Since: 0.3
    """


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


@hookspec
def umbrella_commands() -> Iterable[Command]:
    """Add subcommands to ``umbrella``.

    The core's own (``train``, ``evaluate``, ``serve``, ``launch``, ...) come
    through this hook too, from built-in plugins: the command line imports none
    of them, and a command shipped as its own distribution is a matter of
    packaging.

    Returns:
        Command values (possibly none): a name, one line of help,
        ``add_arguments(parser)`` and ``run(args) -> exit status``. Every
        ``umbrella`` invocation collects every plugin's commands, so this must be
        cheap and import nothing heavy: ``run`` imports what it needs. A name
        already taken (by the core or an earlier plugin) sets the later plugin
        aside: ``umbrella plugins`` shows it broken, with the reason, and the
        other commands work. ``umbrella --help`` lists the core's commands first,
        then the plugins' in the order they were registered.

    Every implementation is called.

    Since: 0.6
    """


# ---------------------------------------------------------------------------
# Listing
# ---------------------------------------------------------------------------


@hookspec
def umbrella_study_kinds() -> Iterable[str]:
    """Name the location kinds this plugin's study reader accepts.

    A kind is what a user types before the colon of a ``KIND:PATH`` location
    (``bids`` for ``bids:/data/ds000001``). ``umbrella plugins`` lists them
    under the plugin. Declaring a kind routes nothing: the reader still
    recognises its own locations (and may take unprefixed ones too).

    Returns:
        Kind names, lower-case (possibly none). Must be cheap: return constants.

    Every implementation is called.

    Since: 0.3
    """
