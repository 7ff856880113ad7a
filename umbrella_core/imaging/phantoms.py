"""The building blocks of synthetic phantoms: a head, lesions and blobs, bias, noise, orientation.

Part of :mod:`umbrella_core.imaging`, which re-exports every public name.
Plugins combine them with their own contrasts (see the first-party plugins' phantom.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import attrs
import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from numpy.typing import ArrayLike, NDArray

#: Orientations phantoms are written in. Scanners and pipelines store volumes in
#: all of these (LAS: FSL/SPM radiological; LPS: DICOM/ITK; LIA: FreeSurfer;
#: PIR: sagittal acquisitions), so a loader that ignores the affine gets the
#: hemisphere wrong on most of them.
PHANTOM_ORIENTATIONS: tuple[tuple[str, str, str], ...] = (
    ("R", "A", "S"),
    ("L", "A", "S"),
    ("L", "P", "S"),
    ("L", "I", "A"),
    ("P", "I", "R"),
)


@attrs.frozen(eq=False)
class HeadPhantom:
    """A smooth synthetic head on a RAS voxel grid.

    The tissue maps are partial-volume fractions in [0, 1] (they sum to at most
    1 per voxel; the remainder is air or bone). World ``x = 0`` is the
    mid-sagittal plane: negative ``x`` is the left hemisphere.

    Attributes:
        affine: 4x4 RAS voxel-to-world matrix (mm).
        wm: White-matter fraction.
        gm: Grey-matter fraction (a folded cortical ribbon).
        csf: Cerebrospinal fluid (around the brain and in the ventricles).
        scalp: Scalp and subcutaneous fat, outside the skull.
        brain_radii: Semi-axes of the brain in mm along x, y and z.
    """

    affine: NDArray[np.float64]
    wm: NDArray[np.float32]
    gm: NDArray[np.float32]
    csf: NDArray[np.float32]
    scalp: NDArray[np.float32]
    brain_radii: tuple[float, float, float]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.wm.shape)

    @property
    def brain(self) -> NDArray[np.float32]:
        """Brain tissue fraction (grey plus white matter)."""
        return self.wm + self.gm

    def image(self, contrasts: Mapping[str, float]) -> NDArray[np.float32]:
        """Mix the tissue maps with one intensity per tissue (missing tissues are 0).

        Args:
            contrasts: Intensity per tissue name: ``wm``, ``gm``, ``csf``, ``scalp``.
        """
        known = {"wm", "gm", "csf", "scalp"}
        unknown = set(contrasts) - known
        if unknown:
            raise ValueError(f"unknown tissues {sorted(unknown)}; known: {sorted(known)}")
        out = np.zeros(self.shape, dtype=np.float32)
        for tissue, value in contrasts.items():
            out += np.float32(value) * getattr(self, tissue)
        return out


def world_grid(shape: Sequence[int], affine: ArrayLike) -> NDArray[np.float32]:
    """World coordinates (mm) of every voxel centre, shape ``(*shape[:3], 3)``."""
    matrix = np.asarray(affine, dtype=np.float64)
    axes = [np.arange(n, dtype=np.float64) for n in shape[:3]]
    ijk = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
    return (ijk @ matrix[:3, :3].T + matrix[:3, 3]).astype(np.float32)


def _soft(distance: NDArray[np.float32], width: float) -> NDArray[np.float32]:
    # A logistic edge rising from 10 % to 90 % over about ``width``: partial
    # volume at tissue borders instead of staircase aliasing.
    width = width / 4.4
    scaled = np.clip(-distance / np.float32(width), -60.0, 60.0)  # exp overflows past ~88
    return (1.0 / (1.0 + np.exp(scaled))).astype(np.float32)


def _folding(
    rng: np.random.Generator, direction: NDArray[np.float32], amplitude: float, waves: int = 12
) -> NDArray[np.float32]:
    """A smooth random function on the sphere of directions, for gyri and sulci."""
    out = np.zeros(direction.shape[:-1], dtype=np.float32)
    for _ in range(waves):
        frequency = rng.normal(size=3)
        frequency *= rng.uniform(6.0, 12.0) / np.linalg.norm(frequency)
        phase = rng.uniform(0.0, 2.0 * np.pi)
        out += np.sin(direction @ frequency.astype(np.float32) + np.float32(phase))
    return out * np.float32(amplitude / math.sqrt(waves / 2.0))


def head_phantom(
    rng: np.random.Generator,
    shape: Sequence[int],
    voxel_size: Sequence[float],
    *,
    fill: float = 0.85,
    position_jitter: float = 0.5,
    size_jitter: float = 0.02,
) -> HeadPhantom:
    """Build a smooth, subject-specific synthetic head.

    An ellipsoidal head (scalp, skull, CSF) around a brain with a folded
    cortical ribbon, white matter and two ventricles. Head size, position in the
    field of view and folding pattern vary with ``rng``; the head centre is at
    world ``(0, 0, 0)``. The default jitter is small, as in images aligned to a
    template: the demo's few training steps must go to the finding, not to
    head placement.

    Args:
        rng: Source of randomness (the phantom is a function of its state).
        shape: Grid size ``(X, Y, Z)``.
        voxel_size: Voxel size in mm along each axis.
        fill: Fraction of the field of view the head spans along each axis.
        position_jitter: Largest offset of the head from the centre of the
            field of view, in voxels per axis.
        size_jitter: Largest relative change of the head's semi-axes.

    Returns:
        A :class:`HeadPhantom` on a RAS grid.
    """
    dims = tuple(int(s) for s in shape[:3])
    zooms = np.asarray(voxel_size, dtype=np.float64)[:3]
    fov = np.asarray(dims) * zooms
    shift = rng.uniform(-position_jitter, position_jitter, size=3) * zooms
    affine = np.eye(4)
    affine[:3, :3] = np.diag(zooms)
    affine[:3, 3] = -(np.asarray(dims) - 1) / 2.0 * zooms + shift

    head = fov * fill / 2.0 * rng.uniform(1.0 - size_jitter, 1.0 + size_jitter, size=3)
    xyz = world_grid(dims, affine)
    scaled = xyz / head.astype(np.float32)
    r = np.sqrt(np.sum(scaled * scaled, axis=-1))
    direction = scaled / np.maximum(r, 1e-3)[..., None]
    width = float(zooms.min() / head.min())  # about one voxel, in units of r

    brain_edge = 0.86 + _folding(rng, direction, 0.025)
    white_edge = brain_edge - 0.13 + _folding(rng, direction, 0.045)
    inside_head = _soft(1.0 - r, width)
    inside_skull = _soft(0.93 - r, width)
    brain = _soft(brain_edge - r, width)
    white = _soft(white_edge - r, width)

    # Two ventricles, mirror images across the mid-sagittal plane.
    ventricles = np.zeros(dims, dtype=np.float32)
    vent_radii = np.array([0.09, 0.28, 0.14], dtype=np.float32) * rng.uniform(0.85, 1.2)
    for side in (-1.0, 1.0):
        centre = np.array([0.11 * side, -0.02, 0.08], dtype=np.float32)
        d = np.sqrt(np.sum(((scaled - centre) / vent_radii) ** 2, axis=-1))
        ventricles = np.maximum(ventricles, _soft(1.0 - d, width / vent_radii.min()))

    wm = white * (1.0 - ventricles)
    gm = brain - white
    csf = (inside_skull - brain) + white * ventricles
    scalp = inside_head - _soft(0.965 - r, width)
    return HeadPhantom(
        affine=affine,
        wm=wm.astype(np.float32),
        gm=np.clip(gm, 0.0, 1.0).astype(np.float32),
        csf=np.clip(csf, 0.0, 1.0).astype(np.float32),
        scalp=np.clip(scalp, 0.0, 1.0).astype(np.float32),
        brain_radii=tuple(float(h * 0.86) for h in head),  # type: ignore[arg-type]
    )


def hemisphere_centre(
    rng: np.random.Generator,
    phantom: HeadPhantom,
    side: str,
    *,
    depth: tuple[float, float] = (0.3, 0.55),
) -> NDArray[np.float64]:
    """A random world point (mm) inside the ``left`` or ``right`` hemisphere.

    The lateral offset is a fraction ``depth`` of the brain's half-width, so the
    point stays off the midline and inside the brain; the anterior-posterior and
    superior-inferior positions vary too.

    Args:
        rng: Source of randomness.
        phantom: The head the point lies in.
        side: ``"left"`` (world x < 0) or ``"right"`` (world x > 0).
        depth: Range of the lateral offset, as a fraction of the brain half-width.
    """
    sign = {"left": -1.0, "right": 1.0}.get(str(side).lower())
    if sign is None:
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    rx, ry, rz = phantom.brain_radii
    return np.array(
        [
            sign * rng.uniform(*depth) * rx,
            rng.uniform(-0.35, 0.35) * ry,
            rng.uniform(-0.25, 0.35) * rz,
        ]
    )


def hemisphere_mask(phantom: HeadPhantom, side: str) -> NDArray[np.float32]:
    """A soft mask of one side of the mid-sagittal plane (world x = 0).

    Multiplying a lesion's surroundings by it keeps them in their hemisphere,
    as the falx does for oedema.

    Args:
        phantom: The head whose grid the mask is on.
        side: ``"left"`` (world x < 0) or ``"right"`` (world x > 0).
    """
    sign = {"left": -1.0, "right": 1.0}.get(str(side).lower())
    if sign is None:
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    x = world_grid(phantom.shape, phantom.affine)[..., 0]
    voxel = float(np.sqrt((phantom.affine[:3, :3] ** 2).sum(axis=0)).min())
    return _soft(np.float32(sign) * x, voxel)


def blob(
    shape: Sequence[int],
    affine: ArrayLike,
    centre: ArrayLike,
    radius: float,
) -> NDArray[np.float32]:
    """A soft-edged sphere in world coordinates: 1 inside, 0 outside.

    Args:
        shape: Grid size ``(X, Y, Z)``.
        affine: Voxel-to-world matrix of the grid.
        centre: Sphere centre in world mm.
        radius: Sphere radius in mm.

    Returns:
        A float32 weight map of ``shape`` with an edge about one voxel wide.
    """
    matrix = np.asarray(affine, dtype=np.float64)
    xyz = world_grid(shape, matrix)
    distance = np.sqrt(np.sum((xyz - np.asarray(centre, dtype=np.float32)) ** 2, axis=-1))
    voxel = float(np.sqrt((matrix[:3, :3] ** 2).sum(axis=0)).min())
    return _soft(np.float32(radius) - distance, voxel)


def bias_field(
    rng: np.random.Generator, shape: Sequence[int], strength: float = 0.1
) -> NDArray[np.float32]:
    """A smooth multiplicative intensity inhomogeneity around 1 (receive-coil bias).

    Args:
        rng: Source of randomness.
        shape: Grid size ``(X, Y, Z)``.
        strength: Rough relative amplitude (0.1 is about +-10 %).
    """
    axes = [np.linspace(-1.0, 1.0, int(n), dtype=np.float32) for n in shape[:3]]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    linear = rng.normal(size=3) * strength / 2.0
    quadratic = rng.normal(size=3) * strength / 3.0
    log_field = (
        linear[0] * x
        + linear[1] * y
        + linear[2] * z
        + quadratic[0] * x * x
        + quadratic[1] * y * y
        + quadratic[2] * z * z
    )
    return np.exp(log_field).astype(np.float32)


def rician_noise(rng: np.random.Generator, image: ArrayLike, sigma: float) -> NDArray[np.float32]:
    """Magnitude of ``image`` plus complex Gaussian noise, as in MR magnitude images.

    The background gets the Rayleigh floor real scans have instead of zeros.
    """
    data = np.asarray(image, dtype=np.float32)
    real = data + rng.normal(0.0, sigma, size=data.shape).astype(np.float32)
    imag = rng.normal(0.0, sigma, size=data.shape).astype(np.float32)
    return np.sqrt(real * real + imag * imag)


def random_orientation(
    rng: np.random.Generator,
    choices: Sequence[tuple[str, str, str]] = PHANTOM_ORIENTATIONS,
) -> tuple[str, str, str]:
    """Pick the orientation a phantom is written in (see :data:`PHANTOM_ORIENTATIONS`)."""
    return tuple(choices[int(rng.integers(len(choices)))])  # type: ignore[return-value]
