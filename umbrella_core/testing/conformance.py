"""Conformance checks a modality plugin runs in its own tests (study readers: study_conformance).

Each ``check_*`` function raises :class:`ConformanceError` (an AssertionError,
so pytest reports it as a failed test) with a message naming the plugin, the
modality and what the core would trip over. They are plain functions: call
them from any test, or use the ``umbrella_conformance`` fixture of the pytest
plugin, which supplies the temporary folders.

Typical use in a modality plugin's tests::

    from umbrella_core.testing import check_modality_plugin
    import my_pet.plugin as plugin

    def test_conformance(tmp_path):
        check_modality_plugin(plugin, tmp_path, entry_point="pet")

A study plugin's checks are in :mod:`umbrella_core.testing.study_conformance`.

Importing this module does not import torch or nibabel.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from umbrella_core.errors import UmbrellaError
from umbrella_core.types import Demo, ModalitySpec, PhantomFile, Windows

__all__ = [
    "ConformanceError",
    "SPLITS",
    "check_registration",
    "check_entry_point",
    "check_spec",
    "check_loader",
    "check_phantom_round_trip",
    "check_orientation",
    "check_patch_embedder",
    "check_augment_presets",
    "check_modality_plugin",
    "check_light_import",
    "write_phantom",
]

#: The splits a StudyRecord may name.
SPLITS = ("train", "validation", "test")

_NAME = re.compile(r"^[a-z][a-z0-9_+-]*$")


class ConformanceError(AssertionError):
    """A plugin does not do what the core relies on."""


def _require(condition: object, message: str) -> None:
    if not condition:
        raise ConformanceError(message)


def _plugin_name(plugin: object) -> str:
    return getattr(plugin, "__name__", None) or type(plugin).__name__


def _hooks(plugin: object) -> Any:
    from umbrella_core.testing.helpers import registered_hooks

    try:
        return registered_hooks(plugin)
    except Exception as exc:  # pluggy's validation errors: report them as conformance
        raise ConformanceError(
            f"plugin {_plugin_name(plugin)!r}: hook implementations do not match the "
            f"hook specifications: {exc}"
        ) from exc


# ---------------------------------------------------------------------------
# Registration metadata
# ---------------------------------------------------------------------------


def check_spec(spec: ModalitySpec) -> None:
    """One ModalitySpec's metadata: names, patterns, phantom labels and callables."""
    where = f"modality {spec.name!r}"
    _require(isinstance(spec, ModalitySpec), f"{spec!r} is not a ModalitySpec")
    for name in (spec.name, *spec.aliases):
        _require(
            _NAME.match(name),
            f"{where}: name or alias {name!r} must be lower-case letters, digits, _ + -, "
            "starting with a letter (users type it in --modalities and kind:PATH)",
        )
    _require(
        len({spec.name, *spec.aliases}) == 1 + len(spec.aliases),
        f"{where}: the name and aliases {spec.aliases} repeat each other",
    )
    _require(callable(spec.load), f"{where}: load is not callable")
    for pattern in spec.file_patterns:
        _require(
            isinstance(pattern, str) and pattern.strip() == pattern and pattern,
            f"{where}: file pattern {pattern!r} must be a non-empty string without spaces around",
        )
        _require(
            "/" not in pattern and os.sep not in pattern,
            f"{where}: file pattern {pattern!r} matches file names, not paths",
        )
        _require(
            any(c in pattern for c in "*?["),
            f"{where}: file pattern {pattern!r} has no wildcard: it would match one file name",
        )
        _require(
            not fnmatch.fnmatch("README.md", pattern) and not fnmatch.fnmatch("x.json", pattern),
            f"{where}: file pattern {pattern!r} matches unrelated files (README.md, x.json)",
        )
    _require(
        len(set(spec.file_patterns)) == len(spec.file_patterns),
        f"{where}: file patterns repeat: {spec.file_patterns}",
    )
    demo = spec.demo
    _require(demo is None or isinstance(demo, Demo), f"{where}: demo is not a Demo")
    if demo is not None and demo.phantom is not None:
        _require(callable(demo.phantom), f"{where}: demo.phantom is not callable")
        _require(
            len(demo.labels) >= 2 and len(set(demo.labels)) == len(demo.labels),
            f"{where}: demo.labels {demo.labels} must be two or more distinct answers",
        )
        _require(demo.question.strip(), f"{where}: demo.question is empty")
    for field in ("companions", "configure"):
        value = getattr(spec, field)
        _require(value is None or callable(value), f"{where}: {field} is not callable")
    windows = spec.windows
    _require(windows is None or isinstance(windows, Windows), f"{where}: windows is not a Windows")
    if windows is not None:
        _require(
            callable(windows.series) and callable(windows.frames),
            f"{where}: windows.series and windows.frames must be callable",
        )
        _require(
            windows.window is None or callable(windows.window),
            f"{where}: windows.window is not callable",
        )
    if demo is not None and (demo.shape is not None or demo.patch_size is not None):
        try:
            spec.for_demo()
        except ValueError as exc:
            raise ConformanceError(f"{where}: the demo geometry is invalid: {exc}") from exc


def check_registration(plugin: object, *, entry_point: str | None = None) -> list[ModalitySpec]:
    """The plugin's hooks match the hook specifications and its modalities are well formed.

    Checks that every ``umbrella_*`` function is a known hook asking only for
    known arguments, that ``umbrella_modalities`` returns ModalitySpec values
    with lower-case names and aliases unique among themselves and against
    ``umbrella_core``'s other registered plugins, and (``entry_point`` given)
    that the ``umbrella`` entry point of that name is installed and loads this
    plugin.

    Returns:
        The ModalitySpec values the plugin declares (possibly none: a study plugin).
    """
    hooks = _hooks(plugin)
    specs: list[ModalitySpec] = []
    for result in hooks.umbrella_modalities():
        for spec in result or ():
            _require(
                isinstance(spec, ModalitySpec),
                f"plugin {_plugin_name(plugin)!r}: umbrella_modalities returned "
                f"{type(spec).__name__}, expected ModalitySpec",
            )
            check_spec(spec)
            specs.append(spec)
    seen: dict[str, str] = {}
    for spec in specs:
        for key in (spec.name, *spec.aliases):
            _require(
                key not in seen,
                f"plugin {_plugin_name(plugin)!r}: {key!r} names both modality "
                f"{seen.get(key)!r} and {spec.name!r}",
            )
            seen[key] = spec.name
    # The plugin must register in a real manager beside the built-ins.
    from umbrella_core.testing.helpers import fresh_plugin_manager

    try:
        fresh_plugin_manager(plugin).modality_registry()
    except Exception as exc:
        raise ConformanceError(f"plugin {_plugin_name(plugin)!r} does not register: {exc}") from exc
    if entry_point is not None:
        check_entry_point(entry_point, plugin)
    return specs


def check_entry_point(name: str, plugin: object | None = None) -> Any:
    """The ``umbrella`` entry point ``name`` is installed, imports, and is ``plugin``."""
    from importlib import metadata

    points = [p for p in metadata.entry_points(group="umbrella") if p.name == name]
    _require(
        points,
        f"no 'umbrella' entry point named {name!r} is installed: declare it under "
        "[project.entry-points.umbrella] in pyproject.toml and pip install the distribution",
    )
    _require(len(points) == 1, f"entry point {name!r} is declared {len(points)} times")
    try:
        loaded = points[0].load()
    except Exception as exc:
        raise ConformanceError(
            f"entry point {name!r} ({points[0].value}) does not import: {type(exc).__name__}: {exc}"
        ) from exc
    if plugin is not None:
        _require(
            loaded is plugin,
            f"entry point {name!r} loads {points[0].value}, not {_plugin_name(plugin)}",
        )
    return loaded


def check_light_import(
    module: str, heavy: Sequence[str] = ("torch", "nibabel", "transformers")
) -> None:
    """Importing ``module`` and declaring its modalities pulls in none of ``heavy``.

    ``umbrella plugins`` imports every installed plugin: a torch import at
    module level makes it take seconds.
    """
    from umbrella_core.testing.helpers import modules_imported_by

    code = (
        f"import {module} as p\n"
        "f = getattr(p, 'umbrella_modalities', None)\n"
        "f() if callable(f) else None"
    )
    found = modules_imported_by(code, heavy)
    _require(not found, f"importing {module} imports {', '.join(found)}: import them lazily")


# ---------------------------------------------------------------------------
# Loading and phantoms
# ---------------------------------------------------------------------------


def write_phantom(
    spec: ModalitySpec,
    folder: str | os.PathLike[str],
    label: str,
    *,
    seed: int = 0,
    stem: str = "sub-01",
) -> list[str]:
    """Write ``spec``'s phantom for ``label`` as NIfTI files; return their paths in channel order.

    Files are named ``{stem}_{suffix}.nii.gz`` with :func:`umbrella_core.imaging.save_nifti`,
    as the built-in demo writes them.
    """
    import numpy as np

    from umbrella_core.imaging import save_nifti

    demo = spec.demo
    if demo is None or demo.phantom is None:
        raise ConformanceError(f"modality {spec.name!r} has no phantom")
    files = demo.phantom(spec, np.random.default_rng(seed), label)
    _require(
        files and all(isinstance(f, PhantomFile) for f in files),
        f"modality {spec.name!r}: phantom must return a non-empty list of PhantomFile",
    )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return [
        save_nifti(folder / f"{stem}_{f.suffix}.nii.gz", f.data, f.affine, tr=f.tr) for f in files
    ]


def check_loader(spec: ModalitySpec, paths: Sequence[str]) -> Any:
    """``spec.load`` on ``paths``: shape ``(channels, *shape)``, float32, finite, deterministic.

    Returns:
        The loaded array.
    """
    import numpy as np

    where = f"modality {spec.name!r}: load({', '.join(os.path.basename(p) for p in paths)})"
    first = spec.load(spec, tuple(paths))
    _require(isinstance(first, np.ndarray), f"{where} returned {type(first).__name__}, not ndarray")
    _require(
        first.shape == spec.input_shape,
        f"{where} gave shape {first.shape}, expected (channels, *shape) = {spec.input_shape}",
    )
    _require(first.dtype == np.float32, f"{where} gave dtype {first.dtype}, expected float32")
    _require(np.isfinite(first).all(), f"{where} gave NaN or Inf values")
    _require(float(np.ptp(first)) > 0, f"{where} gave a constant array")
    second = spec.load(spec, tuple(paths))
    _require(
        np.array_equal(first, second),
        f"{where} is not deterministic: loading the same file twice gave different arrays",
    )
    return first


def check_phantom_round_trip(
    spec: ModalitySpec,
    folder: str | os.PathLike[str],
    *,
    seeds: Sequence[int] = (0, 1, 2),
    label_of: Callable[[Any], str] | None = None,
) -> dict[str, list[Any]]:
    """Phantoms written to disk and read back by the plugin's own loader carry their label.

    For each label and seed the phantom is written with ``save_nifti`` and
    loaded (checked with :func:`check_loader`). Then:

    * the same seed with different labels gives different inputs;
    * ``label_of(array)`` (when given) returns the label of every sample;
    * otherwise a nearest-centroid classifier, leave-one-out over the samples,
      on block means (4 blocks per spatial axis) recovers every label: the answer
      is in the image, so the demo can be learnt.
      Where the label is not in the voxel values as such (an fMRI activation is
      a correlation with the task over time), pass ``label_of``.

    Returns:
        label → the loaded arrays, one per seed.
    """
    import numpy as np

    demo = spec.demo
    if demo is None or demo.phantom is None:
        raise ConformanceError(f"modality {spec.name!r} has no phantom")
    folder = Path(folder)
    loaded: dict[str, list[Any]] = {}
    for label in demo.labels:
        for seed in seeds:
            paths = write_phantom(spec, folder / f"{label}-{seed}", label, seed=seed)
            loaded.setdefault(label, []).append(check_loader(spec, paths))
    labels = list(loaded)
    check_orientation(spec, folder / "orientation", label=labels[0], seed=seeds[0])
    for i, seed in enumerate(seeds):
        arrays = [loaded[label][i] for label in labels]
        for a in range(len(labels)):
            for b in range(a + 1, len(labels)):
                _require(
                    not np.array_equal(arrays[a], arrays[b]),
                    f"modality {spec.name!r}: the phantoms of {labels[a]!r} and {labels[b]!r} "
                    f"(seed {seed}) load to the same input: the label is not in the image",
                )
    if label_of is not None:
        for label, arrays in loaded.items():
            for seed, array in zip(seeds, arrays, strict=True):
                got = label_of(array)
                _require(
                    got == label,
                    f"modality {spec.name!r}: phantom {label!r} (seed {seed}) loads to an "
                    f"input read as {got!r}",
                )
    elif len(seeds) >= 2:
        samples = [(label, _coarse(a)) for label in labels for a in loaded[label]]
        for k, (label, x) in enumerate(samples):
            centroids = {
                other: np.mean([s for j, (o, s) in enumerate(samples) if o == other and j != k], 0)
                for other in labels
            }
            nearest = min(centroids, key=lambda o: float(np.sum((centroids[o] - x) ** 2)))
            _require(
                nearest == label,
                f"modality {spec.name!r}: the loaded phantom {label!r} is nearer the other "
                f"label's samples ({nearest!r}): the label does not survive writing and loading "
                "(a loader's intensity normalisation may erase it: robust_normalise clips at "
                "the 99.5th percentile, which removes a small bright lesion, so normalise "
                "without clipping, or with a higher upper percentile, for such modalities; if "
                "the label is not in the voxel values themselves, pass label_of)",
            )
    return loaded


def check_orientation(
    spec: ModalitySpec, folder: str | os.PathLike[str], *, label: str, seed: int = 0
) -> None:
    """The loader reads a file by its anatomy, not its storage order (reoriented to RAS).

    The phantom is written twice: as it is, and stored left-to-right the other way
    (LAS: the voxels reversed along the first axis, the affine saying so), the same
    image in the scanner's space. Both must load to the same input; a loader that
    skips the reorientation swaps left and right for every file stored LAS.
    """
    import numpy as np

    from umbrella_core.imaging import save_nifti

    demo = spec.demo
    if demo is None or demo.phantom is None:
        raise ConformanceError(f"modality {spec.name!r} has no phantom")
    folder = Path(folder)
    ras = write_phantom(spec, folder / "ras", label, seed=seed)
    (folder / "las").mkdir(parents=True, exist_ok=True)
    las = []
    for f in demo.phantom(spec, np.random.default_rng(seed), label):
        data = np.asarray(f.data)
        flip = np.eye(4)
        flip[0, 0], flip[0, 3] = -1.0, data.shape[0] - 1
        path = folder / "las" / f"sub-01_{f.suffix}.nii.gz"
        las.append(save_nifti(path, data[::-1].copy(), np.asarray(f.affine) @ flip, tr=f.tr))
    as_stored, reversed_ = spec.load(spec, tuple(ras)), spec.load(spec, tuple(las))
    _require(
        np.allclose(as_stored, reversed_, atol=1e-4),
        f"modality {spec.name!r}: the same phantom stored RAS and LAS loads to different "
        "inputs: the loader does not reorient to RAS (umbrella_core.imaging.load_nifti does), "
        "so left and right would be swapped for files stored the other way",
    )


def _coarse(array: Any, blocks: int = 4) -> Any:
    """Block means over the spatial axes (1, 2, 3): robust to noise and a voxel of jitter."""
    import numpy as np

    out = np.asarray(array, dtype=np.float64)
    for axis in (1, 2, 3):
        parts = np.array_split(out, min(blocks, out.shape[axis]), axis=axis)
        out = np.concatenate([p.mean(axis=axis, keepdims=True) for p in parts], axis=axis)
    return out.ravel()


# ---------------------------------------------------------------------------
# Patch embedders
# ---------------------------------------------------------------------------


def check_patch_embedder(
    plugin: object, spec: ModalitySpec, *, hidden_size: int = 16, batch: int = 2
) -> Any:
    """The plugin's embedder for ``spec``: ``(batch, num_tokens, hidden_size)``, gradients flow.

    Also checks dispatch by name (invariant I2): a spec of the same shape and
    channels under another name gets None from this plugin, unless the plugin
    declares that name too.

    Returns:
        The module.
    """
    import attrs

    from umbrella_core.testing.helpers import embed_and_backpropagate

    hooks = _hooks(plugin)
    module = hooks.umbrella_patch_embedder(spec=spec, hidden_size=hidden_size)
    _require(
        module is not None, f"plugin {_plugin_name(plugin)!r} has no embedder for {spec.name!r}"
    )
    import torch.nn as nn

    _require(
        isinstance(module, nn.Module),
        f"umbrella_patch_embedder({spec.name!r}) returned {type(module).__name__}, not nn.Module",
    )
    try:
        module, _, _ = embed_and_backpropagate(hooks, spec, hidden_size=hidden_size, batch=batch)
    except AssertionError as exc:
        raise ConformanceError(
            f"modality {spec.name!r}: patch embedder for input {(batch, *spec.input_shape)} "
            f"must give {(batch, spec.num_tokens, hidden_size)} with gradients to the input "
            f"and every parameter: {exc}"
        ) from exc
    declared = {
        n for r in hooks.umbrella_modalities() for s in r or () for n in (s.name, *s.aliases)
    }
    stranger = "zz-not-" + spec.name
    if stranger not in declared:
        other = attrs.evolve(spec, name=stranger, aliases=())
        _require(
            hooks.umbrella_patch_embedder(spec=other, hidden_size=hidden_size) is None,
            f"plugin {_plugin_name(plugin)!r} returns an embedder for modality {stranger!r}, "
            "which it does not declare: dispatch by spec.name and return None for others",
        )
    return module


def check_augment_presets(plugin: object, spec: ModalitySpec) -> None:
    """Each of ``spec``'s augmentation presets builds (with the plugin's own augmentations
    and MONAI's) and keeps the input's shape; none mirrors left and right by itself."""
    from umbrella_core.augmentation import build_pipelines

    offered = {a.name: a for r in _hooks(plugin).umbrella_augmentations() for a in r or ()}
    for preset in spec.augment_presets:
        try:
            pipelines = build_pipelines({spec.name: preset}, {spec.name: spec}, offered)
        except UmbrellaError as exc:
            raise ConformanceError(f"modality {spec.name!r}, preset {preset!r}: {exc}") from exc
        _require(
            not any(p.can_mirror for p in pipelines.values()),
            f"modality {spec.name!r}: preset {preset!r} can mirror or turn left and right; "
            "keep side-changing transforms out of presets (answers may name a side)",
        )


def check_modality_plugin(
    plugin: object,
    folder: str | os.PathLike[str],
    *,
    entry_point: str | None = None,
    demo: bool = True,
    hidden_size: int = 16,
    label_of: Mapping[str, Callable[[Any], str]] | None = None,
    light_import: bool = True,
) -> list[ModalitySpec]:
    """Every check above for every modality the plugin declares.

    Args:
        plugin: The plugin module or object.
        folder: An empty scratch folder (phantoms are written there).
        entry_point: The plugin's ``umbrella`` entry-point name, to check it is installed.
        demo: Check at the demo geometry (fast; the default) rather than the full one.
        hidden_size: Width for the embedder check.
        label_of: Modality name → a function reading the label from a loaded array.
        light_import: Check that importing the plugin module imports no torch/nibabel.

    Returns:
        The modalities checked (at the geometry checked).
    """
    specs = check_registration(plugin, entry_point=entry_point)
    _require(specs, f"plugin {_plugin_name(plugin)!r} declares no modality")
    checked = []
    for spec in specs:
        spec = spec.for_demo() if demo else spec
        check_patch_embedder(plugin, spec, hidden_size=hidden_size)
        check_augment_presets(plugin, spec)
        if spec.demo is not None and spec.demo.phantom is not None:
            check_phantom_round_trip(
                spec, Path(folder) / spec.name, label_of=(label_of or {}).get(spec.name)
            )
        checked.append(spec)
    module = getattr(plugin, "__name__", None)
    if light_import and module and type(plugin).__name__ == "module":
        check_light_import(module)
    return checked
