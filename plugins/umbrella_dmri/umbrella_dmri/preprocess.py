"""From FA and MD maps (two 3D files or one 4D file) to a model input."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

import numpy as np

from umbrella_core import DataError, ModalitySpec
from umbrella_core.imaging import as_paths, load_nifti, resize, robust_normalise, zscore_masked

__all__ = ["MAPS", "FA_LIMIT", "FA_CENTRE", "FA_SCALE", "load_dmri", "map_of"]

#: The maps in channel order.
MAPS: tuple[str, ...] = ("FA", "MD")

#: FA lies in [0, 1]; noisy tensor fits overshoot a little, so only an FA map
#: whose 99th percentile exceeds this is refused (a map scaled by 1000, or MD
#: given where FA belongs in units of um^2/ms).
FA_LIMIT = 1.05

#: FA inside the brain becomes ``(FA - FA_CENTRE) / FA_SCALE``: a fixed map,
#: so a global change of FA (with age, say) stays visible, that puts brain
#: tissue around 0 with a spread of about 1 (grey matter near -0.75, white
#: matter 0.75 to 2).
FA_CENTRE = 0.3
FA_SCALE = 0.2

_SUFFIXES = (".nii.gz", ".nii", ".gz")


def map_of(path: str) -> str | None:
    """The map a file name announces (``FA`` or ``MD``), or None.

    Recognises ``sub-01_FA.nii.gz``, FSL's ``dti_FA.nii.gz`` and BIDS
    derivatives' ``sub-01_desc-FA_dwimap.nii.gz`` (case-insensitive): exactly
    one ``_``/``-``/``.`` separated part of the name must be a map name.
    """
    name = os.path.basename(path)
    for suffix in _SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    found = {part.upper() for part in re.split(r"[_\-.]", name)} & set(MAPS)
    return found.pop() if len(found) == 1 else None


def load_dmri(
    spec: ModalitySpec, paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]
) -> np.ndarray:
    """Load FA and MD maps as a ``(channels, *spec.shape)`` float32 array.

    Two forms are accepted:

    * ``channels`` 3D files, one per map, in channel order (FA, MD). When every
      file name announces its map (``*_FA.nii.gz``, ``*_MD.nii.gz``, see
      :func:`map_of`), the files are put in channel order by name, so the order
      a folder listing gives does not matter.
    * One 4D file whose last axis holds the ``channels`` maps in channel order.

    The maps are expected brain-masked (zero outside the brain), as tensor
    fitting tools write them when given a mask. Each map is reoriented to RAS
    and resampled to ``spec.shape`` with trilinear interpolation; the brain is
    where either resampled map is nonzero, and everything outside it is set
    to exactly 0. FA, a unitless ratio, keeps its absolute scale: it is
    clipped to [0, 1] and mapped to ``(FA - FA_CENTRE) / FA_SCALE``. MD
    depends on units (mm^2/s, um^2/ms) and on the fitting tool, so it is
    clipped to its 0.5th and 99.5th percentiles in the brain and z-scored
    there. Inputs centred on 0 with a zero background train much faster than
    [0, 1] maps, whose offset every patch shares (see the T1 loader).

    Args:
        spec: The ``dmri`` modality with the configured shape.
        paths: The file(s), as above.

    Raises:
        DataError: A wrong number of files or volumes, maps of different
            shapes, two files announcing the same map, an FA map outside
            [0, 1], or an unreadable file. The message names the file(s).
    """
    channels = spec.channels
    if not 1 <= channels <= len(MAPS):
        raise ValueError(f"{spec.name}: channels must be 1 to {len(MAPS)} ({', '.join(MAPS)})")
    maps = MAPS[:channels]
    files = as_paths(paths)
    if len(files) == channels:
        volumes = _separate_maps(spec, _in_map_order(files, maps))
    elif len(files) == 1:
        volumes = _stacked_maps(spec, files[0], maps)
    else:
        raise DataError(
            f"{spec.name} takes {channels} 3D files ({', '.join(maps)}) or one 4D file with "
            f"{channels} volumes, got {len(files)} files: {', '.join(files) or 'none'}"
        )
    for name, path, volume in volumes:
        if name == "FA":
            _check_fa(path, volume)
    resized = [resize(volume, spec.shape) for _, _, volume in volumes]
    brain = np.logical_or.reduce([r != 0 for r in resized])
    out = np.empty((channels, *spec.shape), dtype=np.float32)
    for index, ((name, _, _), volume) in enumerate(zip(volumes, resized, strict=False)):
        out[index] = _normalise(name, volume, brain)
    return out


def _in_map_order(files: tuple[str, ...], maps: tuple[str, ...]) -> tuple[str, ...]:
    announced = [map_of(f) for f in files]
    if len(files) < 2 or None in announced:
        return files
    if sorted(announced) != sorted(maps):  # type: ignore[type-var]
        raise DataError(
            f"the file names announce the maps {', '.join(map(str, announced))}, expected "
            f"{', '.join(maps)}: {', '.join(files)}"
        )
    by_map = dict(zip(announced, files, strict=False))
    return tuple(by_map[m] for m in maps)


def _separate_maps(spec: ModalitySpec, files: tuple[str, ...]) -> list[tuple[str, str, np.ndarray]]:
    volumes = []
    for name, path in zip(MAPS, files, strict=False):
        data, _ = load_nifti(path)
        while data.ndim > 3 and data.shape[-1] == 1:
            data = data[..., 0]
        if data.ndim != 3:
            raise DataError(
                f"{path}: expected a 3D {name} map, got shape {data.shape}; give {spec.channels} "
                f"3D files or one 4D file holding the {spec.channels} maps"
            )
        if volumes and data.shape != volumes[0][2].shape:
            raise DataError(
                f"{path}: the {name} map has shape {data.shape} but {volumes[0][1]} has "
                f"{volumes[0][2].shape}; the maps of one scan must share a grid"
            )
        volumes.append((name, path, data))
    return volumes


def _stacked_maps(
    spec: ModalitySpec, path: str, maps: tuple[str, ...]
) -> list[tuple[str, str, np.ndarray]]:
    data, _ = load_nifti(path)
    count = data.shape[3] if data.ndim == 4 else 1 if data.ndim == 3 else -1
    if data.ndim not in (3, 4) or count != len(maps):
        raise DataError(
            f"{path}: expected {len(maps)} maps ({', '.join(maps)}) stacked on the 4th axis, got "
            f"shape {data.shape}; give one 4D file with {len(maps)} volumes or "
            f"{len(maps)} 3D files"
        )
    if data.ndim == 3:
        return [(maps[0], path, data)]
    return [(name, path, data[..., i]) for i, name in enumerate(maps)]


def _check_fa(path: str, volume: np.ndarray) -> None:
    values = volume[volume != 0]
    top = float(np.percentile(values, 99)) if values.size else 0.0
    if top > FA_LIMIT:
        raise DataError(
            f"{path}: FA values reach {top:.4g} (99th percentile) but FA lies in [0, 1]; "
            "is the map scaled, or are the maps in the wrong order (FA first, then MD)?"
        )


def _normalise(name: str, volume: np.ndarray, brain: np.ndarray) -> np.ndarray:
    if name == "FA":
        fa = (np.clip(volume, 0.0, 1.0) - np.float32(FA_CENTRE)) / np.float32(FA_SCALE)
        return np.where(brain, fa, np.float32(0.0)).astype(np.float32)
    return zscore_masked(robust_normalise(np.where(brain, volume, 0.0)), brain)
