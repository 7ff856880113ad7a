"""Hook implementations of the fMRI plugin.

Importing this module is cheap (no torch, no nibabel): ``umbrella plugins``
imports it just to list what it provides. The loader and the phantom import
their dependencies when they are first used. The patch embedder is the core's
generic one (``umbrella_core.default_plugins.embedder``): the plugin gives none.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from umbrella_core import Demo, ModalitySpec, PhantomFile, Windows, hookimpl, positive_settings

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np


def load(spec: ModalitySpec, paths: Sequence[str], max_tr: float | None = None) -> Any:
    """``ModalitySpec.load`` of ``fmri``; see :func:`umbrella_fmri.preprocess.load_bold`."""
    from umbrella_fmri.preprocess import load_bold

    return load_bold(spec, paths, max_tr=max_tr)


def series(
    spec: ModalitySpec,
    paths: Sequence[str],
    target_tr: float | None = None,
    max_tr: float | None = None,
) -> Any:
    """``Windows.series`` of ``fmri``; see :func:`umbrella_fmri.preprocess.bold_series`."""
    from umbrella_fmri.preprocess import bold_series

    return bold_series(spec, paths, target_tr=target_tr, max_tr=max_tr)


def window(
    spec: ModalitySpec,
    paths: Sequence[str],
    index: int,
    target_tr: float | None = None,
    max_tr: float | None = None,
) -> Any:
    """``Windows.window`` of ``fmri``; see :func:`umbrella_fmri.window.bold_window`."""
    from umbrella_fmri.window import bold_window

    return bold_window(spec, paths, index, target_tr=target_tr, max_tr=max_tr)


def companions(spec: ModalitySpec, paths: Sequence[str]) -> list[str]:
    """The BIDS JSON sidecar whose ``RepetitionTime`` the loader reads, when there is one."""
    import os

    from umbrella_fmri.preprocess import sidecar_of

    found = [sidecar_of(path) for path in paths]
    return [path for path in found if os.path.isfile(path)]


def frames(
    spec: ModalitySpec,
    paths: Sequence[str],
    target_tr: float | None = None,
    max_tr: float | None = None,
) -> int:
    """``Windows.frames`` of ``fmri``: the series length from the header."""
    from umbrella_fmri.preprocess import bold_frames

    return bold_frames(spec, paths, target_tr=target_tr, max_tr=max_tr)


def _with_timing(spec: ModalitySpec, **timing: float) -> ModalitySpec:
    """``spec`` whose loader and window functions get ``timing`` as keyword arguments.

    Partials of the functions ``spec`` already has, so settings add up
    (``target_tr`` and ``max_tr``); they stay picklable (DataLoader workers,
    ``umbrella cache build --workers``).
    """
    import functools

    import attrs

    if spec.windows is None:
        raise ValueError(f"{spec.name}: {', '.join(timing)} needs a windowed spec")
    windows = attrs.evolve(
        spec.windows,
        series=functools.partial(spec.windows.series, **timing),
        frames=functools.partial(spec.windows.frames, **timing),
        window=(
            None
            if spec.windows.window is None
            else functools.partial(spec.windows.window, **timing)
        ),
    )
    # load (a fixed window, validate) takes no target_tr: it reads the TR only to check it.
    checks = {k: v for k, v in timing.items() if k == "max_tr"}
    load_with = functools.partial(spec.load, **checks) if checks else spec.load
    return attrs.evolve(spec, windows=windows, load=load_with)


def with_target_tr(spec: ModalitySpec, target_tr: float) -> ModalitySpec:
    """``spec`` resampling every series in time to ``target_tr`` seconds before windowing.

    For example ``with_target_tr(FMRI, 0.8)`` makes a 24-frame window 19.2 s
    long in every cohort.
    """
    return _with_timing(spec, target_tr=target_tr)


def configure(spec: ModalitySpec, settings: dict[str, Any]) -> ModalitySpec:
    """``data.preprocessing.fmri``: ``target_tr`` and ``max_tr``, in seconds.

    ``target_tr``: resample every series to it (:func:`with_target_tr`).
    ``max_tr``: the longest repetition time taken as real (default
    :data:`umbrella_fmri.preprocess.MAX_TR`, 20 s); a longer one is refused
    as milliseconds labelled as seconds.
    """
    timing = positive_settings(spec.name, settings, ("target_tr", "max_tr"))
    return _with_timing(spec, **timing) if timing else spec


def phantom(spec: ModalitySpec, rng: np.random.Generator, label: str) -> list[PhantomFile]:
    """``Demo.phantom`` of ``fmri``: a series twice as long as the model's window."""
    from umbrella_fmri.phantom import make_bold_phantom

    return make_bold_phantom(rng, label, frames=2 * spec.shape[3])


#: ``data.augment.fmri: light``: a small head displacement (2.9°, 2 voxels),
#: the same for every frame of a window (frames are augmented as channels),
#: and a little noise and gain, as between sessions. Motion within a window
#: is left out: it is the artefact preprocessing removes.
LIGHT = (
    {
        "name": "RandAffine",
        "prob": 0.5,
        "rotate_range": (0.05, 0.05, 0.05),
        "translate_range": (2, 2, 2),
        "padding_mode": "border",
    },
    {"name": "RandScaleIntensity", "prob": 0.3, "factors": 0.1},
    {"name": "RandGaussianNoise", "prob": 0.3, "std": 0.05},
)

FMRI = ModalitySpec(
    name="fmri",
    ndim=4,
    # (x, y, z, t): a 3-4 mm BOLD grid and a window of 24 frames (48 s at TR 2 s).
    # Patches of 16^3 voxels x 4 frames give 4 * 4 * 3 * 6 = 288 tokens.
    shape=(64, 64, 48, 24),
    patch_size=(16, 16, 16, 4),
    channels=1,
    load=load,
    # Non-overlapping windows: a 200-frame series gives 8 samples of 24 frames.
    # Without the cache a window is read alone (its frames, the series' saved statistics).
    windows=Windows(series=series, frames=frames, stride=24, window=window),
    companions=companions,
    configure=configure,
    # 3 * 3 * 3 * 2 = 54 tokens for the CPU demo.
    demo=Demo(
        phantom=phantom,
        labels=("left", "right"),
        question="Which hemisphere shows the task activation?",
        shape=(24, 24, 24, 8),
        patch_size=(8, 8, 8, 4),
        # No measure yet: with a second question the fMRI demo learns the
        # hemisphere more slowly (benchmarks/README.md); its phantom reports one.
    ),
    aliases=("bold", "rsfmri", "func"),
    file_patterns=("*_bold.nii.gz", "*_bold.nii"),
    description="BOLD fMRI: a window of frames of a 4D series, RAS, resampled, z-scored per voxel",
    augment_presets={"light": LIGHT},
)


@hookimpl
def umbrella_modalities() -> list[ModalitySpec]:
    return [FMRI]
