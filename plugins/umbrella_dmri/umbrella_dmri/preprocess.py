"""From FA and MD maps (two 3D files or one 4D file), or a raw DWI series, to a model input."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

import numpy as np

from umbrella_core import DataError, ModalitySpec
from umbrella_core.imaging import as_paths, load_nifti, resize, robust_normalise, zscore_masked
from umbrella_dmri import dwi

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
    * A raw diffusion-weighted series: one 4D file with its b-values and
      gradient directions, found next to it (``sub-01_dwi.nii.gz`` with
      ``sub-01_dwi.bval`` and ``sub-01_dwi.bvec``, or FSL's ``bvals``/``bvecs``)
      or given as extra paths (``[dwi.nii.gz, dwi.bval, dwi.bvec]``, any order).
      A 4D file is a series when gradient files go with it; one with more
      volumes than ``channels`` must be. A diffusion tensor is fitted at the
      native resolution inside a ``median_otsu`` brain mask and gives FA and
      MD (mm^2/s), which then go through the same steps as maps read from
      files (see :mod:`umbrella_dmri.dwi`). The fit takes seconds to a minute
      for a whole-brain series: ``umbrella cache build`` does it once per file.

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
            [0, 1], or an unreadable file; for a series, missing gradient
            files, a b-value count other than the volume count, a direction
            table of the wrong shape, no b=0 volume, too few directions, or
            non-finite values. The message names the file(s).
    """
    channels = spec.channels
    if not 1 <= channels <= len(MAPS):
        raise ValueError(f"{spec.name}: channels must be 1 to {len(MAPS)} ({', '.join(MAPS)})")
    maps = MAPS[:channels]
    files = as_paths(paths)
    images, gradients = dwi.split_gradients(files)
    if gradients["bval"] or gradients["bvec"]:
        volumes = _raw_dwi(spec, files, images, gradients, maps)
    elif len(files) == 1:
        data, _ = load_nifti(files[0])
        if _is_raw_dwi(data, files[0], channels):
            volumes = _raw_dwi(spec, files, images, gradients, maps, data)
        elif channels == 1:
            volumes = _separate_maps(spec, files, [data])
        else:
            volumes = _stacked_maps(spec, files[0], maps, data)
    elif len(files) == channels:
        volumes = _separate_maps(spec, _in_map_order(files, maps))
    else:
        raise DataError(
            f"{spec.name} takes {channels} 3D files ({', '.join(maps)}) or one 4D file (the "
            f"{channels} maps, or a raw DWI series with its .bval and .bvec), got "
            f"{len(files)} files: {', '.join(files) or 'none'}"
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


def _separate_maps(
    spec: ModalitySpec, files: Sequence[str], loaded: Sequence[np.ndarray] = ()
) -> list[tuple[str, str, np.ndarray]]:
    volumes: list[tuple[str, str, np.ndarray]] = []
    for index, (name, path) in enumerate(zip(MAPS, files, strict=False)):
        data = loaded[index] if index < len(loaded) else load_nifti(path)[0]
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
    spec: ModalitySpec, path: str, maps: tuple[str, ...], data: np.ndarray
) -> list[tuple[str, str, np.ndarray]]:
    count = data.shape[3] if data.ndim == 4 else 1 if data.ndim == 3 else -1
    if data.ndim not in (3, 4) or count != len(maps):
        raise DataError(
            f"{path}: expected {len(maps)} maps ({', '.join(maps)}) stacked on the 4th axis, got "
            f"shape {data.shape}; give one 4D file with {len(maps)} volumes, "
            f"{len(maps)} 3D files, or a raw DWI series with its .bval and .bvec"
        )
    if data.ndim == 3:
        return [(maps[0], path, data)]
    return [(name, path, data[..., i]) for i, name in enumerate(maps)]


def _is_raw_dwi(data: np.ndarray, path: str, channels: int) -> bool:
    """Whether a single 4D file is a DWI series rather than stacked maps.

    A series has its gradient files next to it; one with more volumes than
    there are maps cannot be maps, so it is a series whose gradient files are
    missing (and :func:`_raw_dwi` says which).
    """
    if data.ndim != 4 or data.shape[3] < 2:
        return False
    return data.shape[3] > channels or any(f is not None for f in dwi.find_gradients(path))


def _raw_dwi(
    spec: ModalitySpec,
    files: Sequence[str],
    images: Sequence[str],
    gradients: dict[str, list[str]],
    maps: tuple[str, ...],
    data: np.ndarray | None = None,
) -> list[tuple[str, str, np.ndarray]]:
    """FA and MD fitted from one DWI series and its b-values and directions."""
    if len(images) != 1 or len(gradients["bval"]) > 1 or len(gradients["bvec"]) > 1:
        raise DataError(
            f"a raw DWI series is one 4D NIfTI file with at most one .bval and one .bvec "
            f"file, got {len(files)} files: {', '.join(files)}"
        )
    image = images[0]
    if data is None:
        data, _ = load_nifti(image)
    if data.ndim != 4 or data.shape[3] < 2:
        raise DataError(
            f"{image}: expected a 4D diffusion-weighted series to go with "
            f"{', '.join(gradients['bval'] + gradients['bvec'])}, got shape {data.shape}"
        )
    found = dwi.find_gradients(image)
    expected = dwi.expected_gradients(image)
    located = []
    for index, kind in enumerate(("bval", "bvec")):
        path = gradients[kind][0] if gradients[kind] else found[index]
        if path is None:
            raise DataError(
                f"{image}: expected {len(maps)} maps ({', '.join(maps)}) stacked on the 4th "
                f"axis or a raw DWI series, got shape {data.shape} and no {kind} file "
                f"({expected[index]} not found); put the .bval and .bvec next to the series "
                "with the same name, or give them as extra paths [series, bval, bvec]"
            )
        located.append(path)
    bval_path, bvec_path = located
    count = data.shape[3]
    bvals = dwi.read_bvals(bval_path, count, image)
    bvecs = dwi.read_bvecs(bvec_path, count, image)
    fa, md = dwi.fit_dti(data, bvals, bvecs, image=image, bval_path=bval_path, bvec_path=bvec_path)
    return [(name, image, volume) for name, volume in zip(maps, (fa, md), strict=False)]


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
