"""Synthetic FA and MD maps with a tumour in one hemisphere."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from umbrella_core import PhantomFile, imaging

__all__ = ["FA_CONTRAST", "MD_CONTRAST", "make_dmri_phantom"]

#: Typical fractional anisotropy per tissue (white matter gets tracts on top).
FA_CONTRAST = {"wm": 0.45, "gm": 0.15, "csf": 0.05}
#: Typical mean diffusivity per tissue in mm^2/s (free water at body temperature: 3e-3).
MD_CONTRAST = {"wm": 0.72e-3, "gm": 0.85e-3, "csf": 3.0e-3}

# A high-grade tumour: a necrotic core with almost free diffusion, inside a
# wide rim of vasogenic oedema where extra water lowers FA and raises MD.
_CORE_FA = 0.08
_CORE_MD = 2.4e-3
_OEDEMA_FA_FACTOR = 0.45
_OEDEMA_MD = 1.45e-3

# Tracts as ellipsoids in coordinates scaled by the brain radii: (centre, radii, FA).
_TRACTS = (
    ((0.0, 0.0, 0.22), (0.5, 0.55, 0.1), 0.75),  # corpus callosum
    ((-0.2, -0.05, -0.05), (0.1, 0.12, 0.65), 0.68),  # left corticospinal tract
    ((0.2, -0.05, -0.05), (0.1, 0.12, 0.65), 0.68),  # right corticospinal tract
)


def make_dmri_phantom(
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
    """FA and MD maps of a head with a tumour in the ``left`` or ``right`` hemisphere.

    Brain-extracted maps as a tensor fit produces them: zero outside the
    intracranial mask, FA high in white matter (highest in the corpus callosum
    and corticospinal tracts), MD highest in CSF, and Gaussian fitting noise.
    The tumour is a necrotic core (FA near 0, MD near that of free water) in
    a rim of oedema (FA lowered, MD raised) that stays in its hemisphere. It
    is placed in world coordinates and the maps are written in
    ``orientation`` (random when None, drawn last so the content only depends
    on ``rng`` and ``label``).

    Args:
        rng: Source of randomness.
        label: ``"left"`` or ``"right"``.
        shape: Grid size in RAS order.
        voxel_size: Voxel size in mm.
        orientation: Axis codes to write in, e.g. ``("L", "A", "S")``.
        core_radius: Range of the necrotic core's radius in mm.
        oedema_radius: Range of the oedema's radius in mm.
        depth: Range of the centre's distance from the midline, as a fraction of
            the brain's half-width. The centre's RAS x coordinate in cm (negative on
            the left) is the sample's ``measure``.

    Returns:
        Two float32 :class:`PhantomFile` values, suffixes ``FA`` and ``MD``, in
        channel order.
    """
    head = imaging.head_phantom(rng, shape, voxel_size)
    fa = head.image(FA_CONTRAST)
    md = head.image(MD_CONTRAST)

    scaled = imaging.world_grid(head.shape, head.affine) / np.asarray(head.brain_radii, np.float32)
    for middle, radii, value in _TRACTS:
        d = np.sqrt(
            np.sum(
                ((scaled - np.asarray(middle, np.float32)) / np.asarray(radii, np.float32)) ** 2,
                axis=-1,
            )
        )
        tract = head.wm * np.clip(1.5 - d, 0.0, 1.0)  # fades out over the ellipsoid's rim
        fa = fa * (1.0 - tract) + np.float32(value) * tract
    fa *= imaging.bias_field(rng, head.shape, strength=0.15)  # subject variation along the tracts

    centre = imaging.hemisphere_centre(rng, head, label, depth=depth)
    oedema = imaging.blob(head.shape, head.affine, centre, rng.uniform(*oedema_radius))
    oedema *= head.brain * imaging.hemisphere_mask(head, label)
    core = imaging.blob(head.shape, head.affine, centre, rng.uniform(*core_radius))
    core *= head.brain
    fa = fa * (1.0 - oedema * np.float32(1.0 - _OEDEMA_FA_FACTOR))
    md = md * (1.0 - oedema) + np.float32(_OEDEMA_MD) * oedema
    fa = fa * (1.0 - core) + np.float32(_CORE_FA) * core
    md = md * (1.0 - core) + np.float32(_CORE_MD) * core

    mask = (head.brain + head.csf) > 0.5
    fa = np.clip(fa + rng.normal(0.0, 0.03, size=fa.shape), 0.0, 1.0)
    md = np.clip(md * (1.0 + rng.normal(0.0, 0.06, size=md.shape)), 0.0, None)
    fa = np.where(mask, fa, 0.0).astype(np.float32)
    md = np.where(mask, md, 0.0).astype(np.float32)

    codes = tuple(orientation) if orientation is not None else imaging.random_orientation(rng)
    files: list[PhantomFile] = []
    for suffix, data in (("FA", fa), ("MD", md)):
        oriented, affine = imaging.reorient(data, head.affine, codes)
        files.append(
            PhantomFile(
                suffix=suffix,
                data=np.ascontiguousarray(oriented),
                affine=affine,
                measure=float(centre[0]) / 10 if not files else None,
            )
        )
    return files
