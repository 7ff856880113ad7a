"""A simple model's view of an image (``umbrella_baselines``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

from umbrella_core.types._convert import lowered
from umbrella_core.types.modality import ModalitySpec


@attrs.frozen(kw_only=True)
class Baseline:
    """A simple model's view of an image, to show beside the VLM's figures (``umbrella_baselines``).

    The core fits a linear model on the features (logistic regression for a
    categorical question, ridge regression for a numeric one) on the run's
    training split, chooses its regularisation on the validation split and
    scores it on the held-out samples the VLM's table uses
    (:mod:`umbrella_core.evaluation.baselines`). For each modality key and
    question the first baseline whose ``applies`` accepts the spec of every
    image of the samples is used: plugins' baselines before the built-in
    ``regional`` one (``trylast``).

    Attributes:
        name: Shown in tables and metric names (``regional``); unique over the
            installed plugins.
        description: One line: what the features are, for the table's header,
            ``metrics.json`` and ``umbrella plugins``.
        applies: ``applies(spec) -> bool``: whether it represents images of
            this :class:`ModalitySpec` (dispatch on ``ndim``, ``channels`` and
            ``shape``; a plugin's baseline for its own modality may test the name).
        features: ``features(spec, image) -> numpy.ndarray``: one image, a
            float32 array of shape ``spec.input_shape`` read as the VLM reads
            it, to a 1-D array of finite numbers whose length depends only on
            the spec. A sample with several images gets their features
            concatenated in placeholder order.
        describe: ``describe(spec) -> str``: what the features of an image of
            this spec are (``64 regional means (4x4x4 grid, 1 channel)``);
            None: ``description``.

    Since: 0.4
    """

    name: str = attrs.field(converter=lowered)
    description: str = ""
    applies: Callable[[ModalitySpec], bool] = attrs.field(eq=False, repr=False)
    features: Callable[[ModalitySpec, Any], Any] = attrs.field(eq=False, repr=False)
    describe: Callable[[ModalitySpec], str] | None = attrs.field(default=None, eq=False, repr=False)
