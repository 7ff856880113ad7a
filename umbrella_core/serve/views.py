"""Slices of a model-ready image for the page: axial, coronal and sagittal planes.

The images are the tensors the model gets (``(channels, x, y, z[, t])``, RAS
after the modality's preprocessing), so the page shows what the model sees.
Planes are drawn in the neurological convention (the patient's right on the
right of the picture, anterior and superior up) and scaled by nearest
neighbour, so no voxel is blurred into another.

(Since 0.3.)
"""

from __future__ import annotations

from typing import Any

import attrs

__all__ = ["PLANES", "Volume", "volume_of"]

#: The planes, in the order the page shows them, and the axis each one cuts.
PLANES = {"axial": 2, "coronal": 1, "sagittal": 0}


@attrs.frozen
class Volume:
    """One channel of an image, ready to slice.

    Attributes:
        data: ``(x, y, z[, t])`` float array.
        low, high: The window of grey values (1st and 99th percentile of the
            whole image), the same for every slice so slices compare.
    """

    data: Any = attrs.field(repr=False)
    low: float
    high: float

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape[:3])

    @property
    def frames(self) -> int:
        return int(self.data.shape[3]) if self.data.ndim == 4 else 1

    def middle(self) -> dict[str, int]:
        return {plane: self.shape[axis] // 2 for plane, axis in PLANES.items()}

    def slice(self, plane: str, index: int, frame: int = 0, *, size: int = 256) -> Any:
        """The plane at ``index`` (clamped) as an 8-bit greyscale picture about ``size`` px."""
        import numpy as np

        data = self.data if self.data.ndim == 3 else self.data[..., min(frame, self.frames - 1)]
        axis = PLANES[plane]
        index = max(0, min(int(index), self.shape[axis] - 1))
        cut = np.take(data, index, axis=axis)
        # Rows top to bottom are anterior->posterior (axial) or superior->inferior;
        # columns left to right run along the remaining RAS axis (x: right on the right).
        picture = cut.T[::-1]
        span = self.high - self.low
        scaled = np.clip((picture - self.low) / (span if span > 0 else 1.0), 0.0, 1.0)
        grey = (scaled * 255).astype(np.uint8)
        zoom = max(1, size // max(grey.shape))
        return np.kron(grey, np.ones((zoom, zoom), dtype=np.uint8))


def volume_of(tensor: Any, channel: int = 0) -> Volume:
    """A :class:`Volume` of one channel of a ``(channels, x, y, z[, t])`` tensor."""
    import numpy as np

    data = np.asarray(tensor[min(channel, tensor.shape[0] - 1)], dtype=np.float32)
    finite = data[np.isfinite(data)]
    if finite.size:
        low, high = (float(v) for v in np.percentile(finite, [1, 99]))
    else:
        low, high = 0.0, 1.0
    return Volume(np.nan_to_num(data), low, high)
