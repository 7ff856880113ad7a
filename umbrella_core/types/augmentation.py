"""An augmentation a plugin offers (``umbrella_augmentations``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import attrs

from umbrella_core.types._convert import as_tuple

__all__ = ["Augmentation", "SIDES"]

#: What an augmentation can do to the left-right axis: nothing, mirror it, or
#: turn it onto another axis (no rewrite of an answer can follow that).
SIDES = ("keep", "mirror", "turn")


def _sides_value(value: Any) -> Any:
    if isinstance(value, str) and value not in SIDES:
        raise ValueError(f"sides must be one of {', '.join(SIDES)} or a function, got {value!r}")
    return value


@attrs.frozen
class Augmentation:
    """An augmentation a plugin offers through ``umbrella_augmentations``.

    Attributes:
        name: What ``data.augment`` lists call it (``RandFAScale``).
        build: ``build(**arguments) -> transform``; the transform takes a
            float32 torch tensor ``(channels, x, y, z)`` and returns one of the
            same shape. A random one should be a MONAI ``Randomizable``
            (``set_random_state``): each sample then draws from its own seed
            (torch's generator is seeded per sample too).
        modalities: The modalities it applies to; empty: any.
        description: One line for ``umbrella plugins``.
        spatial: Whether it moves voxels (a record forbidding ``spatial`` skips
            it). MONAI's are spatial when they come from ``monai.transforms.spatial``.
        sides: ``keep``, ``mirror`` or ``turn`` (see :data:`SIDES`), or
            ``sides(arguments) -> str`` when that depends on the arguments.
        mirrored: ``mirrored(transform) -> bool``: whether its last call
            mirrored x, for records whose laterality is ``swap``; needed when
            ``sides`` can be ``mirror`` (else every call counts as a mirror).
    """

    name: str = attrs.field(converter=str)
    build: Callable[..., Any] = attrs.field(eq=False, repr=False)
    modalities: tuple[str, ...] = attrs.field(default=(), converter=as_tuple)
    description: str = ""
    spatial: bool = False
    sides: str | Callable[[Mapping[str, Any]], str] = attrs.field(
        default="keep", eq=False, converter=_sides_value
    )
    mirrored: Callable[[Any], bool] | None = attrs.field(default=None, eq=False, repr=False)

    def sides_with(self, arguments: Mapping[str, Any]) -> str:
        sides = self.sides(arguments) if callable(self.sides) else self.sides
        if sides not in SIDES:
            raise ValueError(f"{self.name}: sides gave {sides!r}, not one of {', '.join(SIDES)}")
        return str(sides)
