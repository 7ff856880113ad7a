"""Modality-agnostic NIfTI helpers shared by the modality plugins (``umbrella_core.imaging``).

Reading and writing (:func:`load_nifti`, :func:`save_nifti`; the header alone,
bounded and checked: :func:`read_nifti_header`; some frames of a series alone:
:func:`read_frames`), reorientation
(:func:`reorient`), resampling (:func:`resize`), intensity normalisation
(:func:`robust_normalise`, :func:`zscore_time`) and the building blocks of the
synthetic phantoms (:func:`head_phantom`, :func:`blob`, :func:`hemisphere_centre`,
:func:`bias_field`, :func:`rician_noise`, :func:`random_orientation`).

Nothing here knows about a particular modality: plugins combine these pieces
with their own contrasts and conventions. numpy and nibabel are imported with
the module; torch only inside :func:`resize`, so a plugin that imports this
module at hook time does not pull torch into ``umbrella plugins``.

Modules hold them: :mod:`.header` (what a header alone tells, and the
bounds on what a file may allocate), :mod:`.files` (opening only regular,
existing files, and saying why not), :mod:`.formats` (what a file that is not
NIfTI is, for the error), :mod:`.nifti` (reading, writing, reorienting),
:mod:`.frames` (some frames of a series, through saved gzip indexes),
:mod:`.intensity` (resampling, normalisation) and :mod:`.phantoms` (the
phantoms' building blocks); this package re-exports their public names.
"""

from __future__ import annotations

from umbrella_core.imaging.files import missing_file_message
from umbrella_core.imaging.frames import default_series_root, file_fingerprint, read_frames
from umbrella_core.imaging.header import NiftiHeader, read_nifti_header, voxel_ceilings
from umbrella_core.imaging.intensity import (
    resize,
    robust_normalise,
    robust_zscore,
    zscore_masked,
    zscore_time,
)
from umbrella_core.imaging.nifti import RAS, as_paths, load_nifti, reorient, save_nifti
from umbrella_core.imaging.phantoms import (
    PHANTOM_ORIENTATIONS,
    HeadPhantom,
    bias_field,
    blob,
    head_phantom,
    hemisphere_centre,
    hemisphere_mask,
    random_orientation,
    rician_noise,
    world_grid,
)

__all__ = [
    "RAS",
    "PHANTOM_ORIENTATIONS",
    "as_paths",
    "missing_file_message",
    "NiftiHeader",
    "read_nifti_header",
    "voxel_ceilings",
    "load_nifti",
    "read_frames",
    "file_fingerprint",
    "default_series_root",
    "save_nifti",
    "reorient",
    "resize",
    "robust_normalise",
    "zscore_masked",
    "robust_zscore",
    "zscore_time",
    "HeadPhantom",
    "head_phantom",
    "world_grid",
    "blob",
    "hemisphere_centre",
    "hemisphere_mask",
    "bias_field",
    "rician_noise",
    "random_orientation",
]
