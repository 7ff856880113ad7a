"""MONAI's transforms as augmentations: what each can do to the left-right axis, and
its RandAffine built to resample fast."""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from umbrella_core.errors import ConfigError
from umbrella_core.types import Augmentation, ModalitySpec

__all__ = ["monai_augmentation", "is_monai_affine", "fixed_grid", "in_float32"]


def _axes(value: Any, default: Any) -> set[int]:
    value = default if value is None else value
    if value is None:
        return {0, 1, 2}
    if isinstance(value, int):
        return {int(value)}
    return {int(v) for v in value}


def _flip_sides(arguments: Mapping[str, Any]) -> str:
    return "mirror" if 0 in _axes(arguments.get("spatial_axis"), None) else "keep"


def _rot90_sides(arguments: Mapping[str, Any]) -> str:
    return "turn" if 0 in _axes(arguments.get("spatial_axes"), (0, 1)) else "keep"


def _largest(value: Any) -> float:
    if value is None:
        return 0.0
    if isinstance(value, (int, float)):
        return abs(float(value))
    return max((_largest(v) for v in value), default=0.0)


def _rotation_sides(*names: str) -> Callable[[Mapping[str, Any]], str]:
    """A rotation of a quarter turn or more can bring x onto another axis."""

    def sides(arguments: Mapping[str, Any]) -> str:
        angles = max((_largest(arguments.get(name)) for name in names), default=0.0)
        scale = _largest(arguments.get("scale_range"))
        # A scale range of 1 or more can draw a negative factor: a mirror.
        return "turn" if angles >= math.pi / 2 or scale >= 1.0 else "keep"

    return sides


#: MONAI transforms that can change which side is which, with how to tell.
_MONAI_SIDES: dict[str, tuple[Any, Callable[[Any], bool] | None]] = {
    "Flip": (_flip_sides, lambda t: True),
    "RandFlip": (_flip_sides, lambda t: bool(t._do_transform)),
    "RandAxisFlip": ("mirror", lambda t: bool(t._do_transform) and int(t._axis) == 0),
    "Rotate90": (_rot90_sides, None),
    "RandRotate90": (_rot90_sides, None),
    "Transpose": ("turn", None),
    "Rotate": (_rotation_sides("angle"), None),
    "RandRotate": (_rotation_sides("range_x", "range_y", "range_z"), None),
    "Affine": (_rotation_sides("rotate_params"), None),
    "RandAffine": (_rotation_sides("rotate_range"), None),
    "Rand3DElastic": (_rotation_sides("rotate_range"), None),
    "Rand2DElastic": (_rotation_sides("rotate_range"), None),
}


def monai_augmentation(name: str, key: str, offered: Iterable[str]) -> Augmentation:
    import monai.transforms as mt

    cls = getattr(mt, name, None)
    if not (isinstance(cls, type) and issubclass(cls, mt.Transform)):
        known = [
            n
            for n in dir(mt)
            if isinstance(c := getattr(mt, n), type)
            and issubclass(c, mt.Transform)
            and not issubclass(c, mt.MapTransform)
        ] + list(offered)
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(
            f"{key}: no augmentation named {name!r} (neither a plugin's nor a MONAI "
            f"transform){hint}"
        )
    if issubclass(cls, mt.MapTransform):
        plain = name[:-1] if name.endswith("d") else name
        raise ConfigError(
            f"{key}: {name} is a dictionary transform; name the array transform "
            f"{plain!r}, which augmentation applies to each image"
        )
    sides, mirrored = _MONAI_SIDES.get(name, ("keep", None))
    spatial = cls.__module__.startswith("monai.transforms.spatial")
    return Augmentation(name=name, build=cls, sides=sides, mirrored=mirrored, spatial=spatial)


def is_monai_affine(augmentation: Augmentation) -> bool:
    build = augmentation.build
    return getattr(build, "__name__", "") == "RandAffine" and getattr(
        build, "__module__", ""
    ).startswith("monai.")


def fixed_grid(
    augmentation: Augmentation, arguments: Mapping[str, Any], spec: ModalitySpec
) -> dict[str, Any]:
    """Arguments that let MONAI's RandAffine build its sampling grid once, not per call.

    Told the image's size (every image of a modality has its input shape), it
    keeps the grid, for 4 floats per voxel of memory.
    """
    if is_monai_affine(augmentation) and not {"spatial_size", "cache_grid"} & set(arguments):
        return {"spatial_size": tuple(spec.shape[:3]), "cache_grid": True}
    return {}


def in_float32(transform: Any) -> None:
    """MONAI's RandAffine resamples in float64 (its Resample's default, not an argument),
    converting the image and grid each call; images here are float32. In float32 a
    128³ call takes 0.6x the time and moves no voxel by more than 1e-4 of the image's
    range (``tests/test_augment.py``). Left as is where MONAI's internals differ."""
    import torch

    resampler = getattr(transform, "resampler", None)
    if resampler is None or not hasattr(resampler, "dtype"):
        return
    resampler.dtype = torch.float32
    grid = getattr(transform, "_cached_grid", None)
    if isinstance(grid, torch.Tensor):
        transform._cached_grid = grid.to(torch.float32)
