"""Figures of held-out results: confusion matrices and predicted-vs-true scatters.

Figures are plain :class:`matplotlib.figure.Figure` objects on an Agg canvas,
never pyplot's global state, so they draw without a display, in threads and in
tests, and nothing stays open once :func:`save_figure` has written them.
matplotlib is imported when a figure is first made.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from umbrella_core.evaluation.metrics import OTHER_LABEL

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = ["confusion_figure", "scatter_figure", "save_figure"]


def _new_figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _wrapped(title: str, width: int = 44) -> str:
    """A long title (a question) on several lines rather than cut at the figure's edges."""
    import textwrap

    return "\n".join(textwrap.wrap(title, width)) or title


def confusion_figure(confusion: Mapping, *, title: str) -> Figure:
    """Draw a confusion matrix with its counts written in the cells.

    Args:
        confusion: ``{"labels": [...], "matrix": [[int]]}`` as
            :func:`~umbrella_core.evaluation.metrics.categorical_metrics`
            returns it: rows the reference, columns the answer. The
            ``"(other)"`` row (answers outside the classes are never a
            reference) is not drawn, and may be left out of ``matrix``.
        title: The figure's title (the question, say).

    Returns:
        The figure, one axes with ``rows * columns`` cell texts.

    Raises:
        ValueError: The matrix does not fit the labels.
    """
    import numpy as np

    labels = list(confusion["labels"])
    matrix = np.asarray(confusion["matrix"], dtype=int)
    rows = [i for i, label in enumerate(labels) if label != OTHER_LABEL]
    if matrix.ndim != 2 or matrix.shape not in {(len(labels),) * 2, (len(rows), len(labels))}:
        raise ValueError(f"confusion matrix of shape {matrix.shape} does not fit labels {labels!r}")
    if len(matrix) == len(labels):
        matrix = matrix[rows]
    size = 2.5 + 0.6 * len(labels)
    figure = _new_figure(size + 1.0, size)
    axes = figure.add_subplot()
    vmax = max(1, int(matrix.max(initial=0)))
    image = axes.imshow(matrix, cmap="Blues", vmin=0, vmax=vmax)
    figure.colorbar(image, ax=axes, shrink=0.8)
    # White text on the dark half of the colour map stays legible.
    threshold = vmax / 2
    for (row, column), count in np.ndenumerate(matrix):
        axes.text(
            column,
            row,
            str(count),
            ha="center",
            va="center",
            color="white" if count > threshold else "black",
        )
    axes.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    axes.set_yticks(range(len(rows)), [labels[i] for i in rows])
    axes.set_xlabel("answer")
    axes.set_ylabel("reference")
    axes.set_title(_wrapped(title), fontsize="medium")
    return figure


def scatter_figure(
    references: Sequence[float],
    predictions: Sequence[float],
    *,
    title: str,
    mae: float | None,
) -> Figure:
    """Plot answered against true values, with the identity line.

    Args:
        references: The true values.
        predictions: The answered values, one per reference (only the answers
            that parsed as numbers).
        title: The figure's title; ``MAE ...`` is appended when ``mae`` is given.
        mae: The mean absolute error to show, or None.

    Returns:
        The figure, one axes.

    Raises:
        ValueError: The lengths differ.
    """
    if len(references) != len(predictions):
        raise ValueError(f"{len(references)} references but {len(predictions)} predictions to plot")
    from collections import Counter

    figure = _new_figure(5.0, 5.0)
    axes = figure.add_subplot()
    values = [*references, *predictions]
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    if low == high:
        low, high = low - 1, high + 1
    # A margin, so that points on the extremes are drawn whole.
    margin = 0.05 * (high - low)
    low, high = low - margin, high + margin
    axes.plot([low, high], [low, high], color="grey", linestyle="--", label="answer = reference")
    # Answers are often whole numbers: equal points are drawn once, larger by their count.
    counts = Counter(zip(references, predictions, strict=True))
    axes.scatter(
        [x for x, _ in counts],
        [y for _, y in counts],
        s=[16 + 12 * (n - 1) for n in counts.values()],
        alpha=0.7,
        label=f"{len(references)} answers (area: how many)",
    )
    axes.set_xlim(low, high)
    axes.set_ylim(low, high)
    axes.set_aspect("equal")
    axes.set_xlabel("reference")
    axes.set_ylabel("answer")
    shown = title if mae is None else f"{title} (MAE {mae:.3g})"
    axes.set_title(_wrapped(shown), fontsize="medium")
    axes.legend(loc="upper left", fontsize="small")
    return figure


def save_figure(figure: Figure, path: str | os.PathLike) -> Path:
    """Write a figure as PNG, whatever the file name's suffix, and close it.

    Args:
        figure: The figure; a pyplot figure is closed in pyplot too.
        path: Where to write; missing parent folders are created.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=120)
    if figure.canvas.manager is not None:  # made by pyplot: drop it from pyplot's registry
        import matplotlib.pyplot as plt

        plt.close(figure)
    figure.clear()
    return path
