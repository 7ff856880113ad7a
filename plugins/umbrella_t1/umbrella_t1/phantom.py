"""Synthetic T1-weighted heads with a tumour in one hemisphere."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from umbrella_core import PhantomFile, imaging

__all__ = ["T1_CONTRAST", "make_t1_phantom"]

#: Relative T1-weighted intensities: white matter brightest, then scalp fat,
#: grey matter, and dark CSF; bone and air give no signal.
T1_CONTRAST = {"wm": 1.0, "gm": 0.62, "csf": 0.18, "scalp": 0.85}

# Post-contrast appearance of a high-grade tumour: an enhancing core brighter
# than white matter inside a wide rim of vasogenic oedema darker than grey matter.
_CORE = 1.5
_OEDEMA = 0.4


def make_t1_phantom(
    rng: np.random.Generator,
    label: str,
    *,
    shape: Sequence[int] = (48, 56, 48),
    voxel_size: Sequence[float] = (3.5, 3.5, 3.5),
    orientation: Sequence[str] | None = None,
    core_radius: tuple[float, float] = (12.0, 17.0),
    oedema_radius: tuple[float, float] = (35.0, 45.0),
    depth: tuple[float, float] = (0.25, 0.85),
) -> list[PhantomFile]:
    """A post-contrast T1-weighted head with a tumour in the ``left`` or ``right`` hemisphere.

    The head is a low-resolution adult head (a 168 x 196 x 168 mm field of view
    by default) with grey and white matter, CSF and scalp, a smooth bias field,
    Rician noise and a random scanner gain, stored as int16 like scanner
    output. The tumour is an enhancing core surrounded by hypointense oedema
    that stays in its hemisphere (the falx stops it). It is placed in world
    coordinates, then the volume is written in ``orientation`` (random among
    :data:`umbrella_core.imaging.PHANTOM_ORIENTATIONS` when None), so the label
    is only recoverable by a loader that honours the affine.

    The content depends only on ``rng`` and ``label``: the orientation is drawn
    last, so the same seed written in two orientations holds the same head, and
    the same seed with the other label holds the mirror-placed tumour.

    Args:
        rng: Source of randomness.
        label: ``"left"`` or ``"right"``.
        shape: Grid size in RAS order.
        voxel_size: Voxel size in mm.
        orientation: Axis codes to write in, e.g. ``("L", "A", "S")``.
        core_radius: Range of the enhancing core's radius in mm.
        oedema_radius: Range of the oedema's radius in mm.
        depth: Range of the centre's distance from the midline, as a fraction of
            the brain's half-width. The centre's RAS x coordinate in cm (negative on
            the left) is the sample's ``measure``.

    Returns:
        One :class:`PhantomFile` with suffix ``T1w``.
    """
    head = imaging.head_phantom(rng, shape, voxel_size)
    image = head.image(T1_CONTRAST)
    centre = imaging.hemisphere_centre(rng, head, label, depth=depth)
    oedema = imaging.blob(head.shape, head.affine, centre, rng.uniform(*oedema_radius))
    oedema *= head.brain * imaging.hemisphere_mask(head, label)
    core = imaging.blob(head.shape, head.affine, centre, rng.uniform(*core_radius))
    core *= head.brain
    image = image * (1.0 - oedema) + np.float32(_OEDEMA) * oedema
    image = image * (1.0 - core) + np.float32(_CORE) * core
    image *= imaging.bias_field(rng, head.shape, strength=0.1)
    image = imaging.rician_noise(rng, image, sigma=0.035)
    gain = rng.uniform(700.0, 1300.0)
    data = np.clip(np.rint(image * gain), 0, np.iinfo(np.int16).max).astype(np.int16)
    codes = tuple(orientation) if orientation is not None else imaging.random_orientation(rng)
    data, affine = imaging.reorient(data, head.affine, codes)
    return [
        PhantomFile(
            suffix="T1w",
            data=np.ascontiguousarray(data),
            affine=affine,
            measure=float(centre[0]) / 10,
        )
    ]
