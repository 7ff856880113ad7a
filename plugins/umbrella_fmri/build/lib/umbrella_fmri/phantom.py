"""Synthetic BOLD series with a block-design activation in one hemisphere."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from umbrella_core import PhantomFile, imaging

__all__ = ["EPI_CONTRAST", "block_design", "make_bold_phantom"]

#: Relative T2*-weighted (EPI) intensities: CSF brightest, grey above white
#: matter, fat-suppressed scalp dim.
EPI_CONTRAST = {"wm": 0.72, "gm": 1.0, "csf": 1.25, "scalp": 0.25}


def _hrf(tr: float, length: float = 30.0) -> np.ndarray:
    """The canonical double-gamma haemodynamic response sampled every ``tr`` seconds."""
    t = np.arange(0.0, length, tr)
    peak = t**5 * np.exp(-t) / math.gamma(6)
    undershoot = t**15 * np.exp(-t) / math.gamma(16)
    return peak - undershoot / 6.0


def block_design(frames: int, tr: float, block: int = 4) -> np.ndarray:
    """The expected BOLD response to ``block`` frames on, ``block`` off, starting on at frame 0.

    Every subject follows the same paradigm with the same phase, as in a task
    run, so the response shape survives per-voxel z-scoring of any window
    starting at frame 0.

    Returns:
        A float32 array of ``frames`` values scaled to a peak of 1.
    """
    boxcar = ((np.arange(frames) // block) % 2 == 0).astype(np.float64)
    response = np.convolve(boxcar, _hrf(tr))[:frames]
    return (response / max(response.max(), 1e-12)).astype(np.float32)


def make_bold_phantom(
    rng: np.random.Generator,
    label: str,
    *,
    frames: int = 48,
    shape: Sequence[int] = (40, 48, 40),
    voxel_size: Sequence[float] = (4.0, 4.0, 4.0),
    tr: float = 2.0,
    orientation: Sequence[str] | None = None,
    activation_radius: tuple[float, float] = (30.0, 40.0),
    depth: tuple[float, float] = (0.3, 0.55),
    signal_change: float = 0.04,
    noise: float = 0.012,
) -> list[PhantomFile]:
    """A BOLD series whose task activation sits in the ``left`` or ``right`` hemisphere.

    EPI contrast on a synthetic head; every voxel gets thermal noise
    (``noise``, relative to grey matter), a slow drift and the global signal
    fluctuation shared by the brain; brain voxels of a large sphere in one
    hemisphere (a lateralised task recruits much of one hemisphere) add
    :func:`block_design` scaled to ``signal_change`` of their baseline. Stored
    as int16. The activation is placed in world coordinates and the series is
    written in ``orientation`` (random when None, drawn last so the content
    only depends on ``rng`` and ``label``).

    ``tr`` sets the timing of the simulated haemodynamic response and is
    written to the header (``pixdim[4]``).

    Args:
        rng: Source of randomness.
        label: ``"left"`` or ``"right"``.
        frames: Number of time points.
        shape: Spatial grid size in RAS order.
        voxel_size: Voxel size in mm.
        tr: Repetition time in seconds used to simulate the response.
        orientation: Axis codes to write in, e.g. ``("L", "A", "S")``.
        activation_radius: Range of the activated sphere's radius in mm.
        depth: Range of the centre's distance from the midline, as a fraction of
            the brain's half-width. The centre's RAS x coordinate in cm (negative on
            the left) is the sample's ``measure``.
        signal_change: Peak activation as a fraction of the baseline.
        noise: Standard deviation of the thermal noise, relative to grey matter.

    Returns:
        One :class:`PhantomFile` with suffix ``bold`` and data of shape
        ``(*shape, frames)`` in the written orientation.
    """
    head = imaging.head_phantom(rng, shape, voxel_size)
    baseline = head.image(EPI_CONTRAST) * imaging.bias_field(rng, head.shape, strength=0.15)
    centre = imaging.hemisphere_centre(rng, head, label, depth=depth)
    active = imaging.blob(head.shape, head.affine, centre, rng.uniform(*activation_radius))
    active *= head.brain * imaging.hemisphere_mask(head, label)

    time = np.arange(frames, dtype=np.float32)
    response = block_design(frames, tr)
    drift = rng.normal(0.0, 0.01) * (time - time.mean()) / max(frames, 1)
    global_signal = rng.normal(0.0, 0.003, size=frames).astype(np.float32)
    modulation = (
        1.0
        + active[..., None] * np.float32(signal_change) * response
        + (head.brain + head.csf)[..., None] * (drift + global_signal)
    )
    series = baseline[..., None] * modulation
    series += rng.normal(0.0, noise, size=series.shape).astype(np.float32)
    gain = rng.uniform(400.0, 900.0)
    data = np.clip(np.rint(np.abs(series) * gain), 0, np.iinfo(np.int16).max).astype(np.int16)

    codes = tuple(orientation) if orientation is not None else imaging.random_orientation(rng)
    data, affine = imaging.reorient(data, head.affine, codes)
    return [
        PhantomFile(
            suffix="bold",
            data=np.ascontiguousarray(data),
            affine=affine,
            tr=tr,
            measure=float(centre[0]) / 10,
        )
    ]
