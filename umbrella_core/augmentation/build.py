"""``data.augment`` to each modality's :class:`~umbrella_core.augmentation.values.Pipeline`:
presets, names and arguments checked, each pipeline tried once; the run's check of its records."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from umbrella_core.augmentation.monai_transforms import (
    fixed_grid,
    in_float32,
    is_monai_affine,
    monai_augmentation,
)
from umbrella_core.augmentation.values import (
    AugmentStep,
    Pipeline,
    fold,
    plain_tensor,
    unfold,
)
from umbrella_core.errors import ConfigError, UmbrellaError
from umbrella_core.types import Augmentation, ModalitySpec

__all__ = ["build_pipelines", "run_pipelines"]

#: ``data.augment.<modality>`` values that mean no augmentation.
_OFF = ("", "no", "off", "none", "false")


def _is_off(value: Any) -> bool:
    """None, YAML's false (a bare ``no``/``off``) or one of :data:`_OFF`: no augmentation."""
    if value is None or value is False:
        return True
    return isinstance(value, str) and value.strip().lower() in _OFF


def _entries(value: Any, key: str, spec: ModalitySpec) -> list[tuple[str, Mapping[str, Any]]]:
    """``(key, {name: ..., **arguments})`` per configured transform, presets expanded."""
    if _is_off(value):
        return []
    items = [value] if isinstance(value, (str, Mapping)) else value
    if not isinstance(items, (list, tuple)):
        raise ConfigError(f"{key}: expected a preset name or a list of transforms, got {value!r}")
    out: list[tuple[str, Mapping[str, Any]]] = []
    for i, item in enumerate(items):
        where = f"{key}[{i}]" if not isinstance(value, (str, Mapping)) else key
        if isinstance(item, str):
            preset = spec.augment_presets.get(item)
            if preset is None:
                names = ", ".join(sorted(spec.augment_presets)) or "none"
                raise ConfigError(
                    f"{where}: {spec.name} has no augmentation preset {item!r} (its presets: "
                    f"{names}); or give transforms as {{name: RandAffine, prob: 0.5, ...}}"
                )
            out.extend((f"{where} ({item}[{j}])", dict(e)) for j, e in enumerate(preset))
        elif isinstance(item, Mapping):
            if not isinstance(item.get("name"), str):
                raise ConfigError(f"{where}: a transform needs a name, e.g. {{name: RandAffine}}")
            out.append((where, dict(item)))
        else:
            raise ConfigError(f"{where}: expected a transform {{name: ...}}, got {item!r}")
    return out


def _check_arguments(key: str, name: str, build: Any, arguments: Mapping[str, Any]) -> None:
    try:
        signature = inspect.signature(build)
    except (TypeError, ValueError):
        return
    parameters = signature.parameters
    if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        return
    known = [
        n for n, p in parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    for argument in arguments:
        if argument not in known:
            close = difflib.get_close_matches(argument, known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(
                f"{key}: {name} takes no argument {argument!r}{hint}; its arguments: "
                f"{', '.join(known)}"
            )


#: How much larger than the image an augmentation's output grid may be: a grid that
#: size is allocated for every sample (and again in the probe below) before anything
#: would refuse it.
MAX_GRID_FACTOR = 8


def _check_sizes(key: str, name: str, arguments: Mapping[str, Any], spec: ModalitySpec) -> None:
    """Refuse a ``*size`` argument (``spatial_size``, ``roi_size``) whose grid is far larger
    than the image's: ``[2000, 2000, 2000]`` tried to allocate 64 GB before MONAI refused."""
    image = 1
    for extent in spec.shape[:3]:
        image *= int(extent)
    for argument, value in arguments.items():
        if "size" not in argument or not isinstance(value, (list, tuple)) or not value:
            continue
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            continue
        grid = 1
        for extent in value:
            grid *= max(int(extent), 1)
        if grid > MAX_GRID_FACTOR * image:
            raise ConfigError(
                f"{key}: {name}: {argument} {list(value)} is {grid:,} voxels, over "
                f"{MAX_GRID_FACTOR}x the {spec.name} image's {image:,} "
                f"({'x'.join(map(str, spec.shape[:3]))}); give a size near the image's"
            )


def _step(
    key: str, entry: Mapping[str, Any], augmentation: Augmentation, spec: ModalitySpec
) -> AugmentStep:
    name = augmentation.name
    arguments = {k: v for k, v in entry.items() if k != "name"}
    _check_arguments(key, name, augmentation.build, arguments)
    prob = arguments.get("prob", 0.0)
    if isinstance(prob, bool) or not isinstance(prob, (int, float)) or not 0 <= prob <= 1:
        # MONAI would clip it silently.
        raise ConfigError(f"{key}: {name}: prob must be a number from 0 to 1, got {prob!r}")
    _check_sizes(key, name, arguments, spec)
    try:
        transform = augmentation.build(**arguments, **fixed_grid(augmentation, arguments, spec))
        if is_monai_affine(augmentation):
            in_float32(transform)
        sides = augmentation.sides_with(arguments)
    except Exception as exc:  # noqa: BLE001 (MONAI raises many kinds on bad arguments)
        raise ConfigError(f"{key}: {name}: {type(exc).__name__}: {exc}") from None
    return AugmentStep(
        key, name, arguments, sides, transform, augmentation.mirrored, augmentation.spatial
    )


def build_pipelines(
    settings: Mapping[str, Any],
    specs: Mapping[str, ModalitySpec],
    offered: Mapping[str, Augmentation],
    *,
    resolve: Callable[[str], str] | None = None,
) -> dict[str, Pipeline]:
    """Each augmented modality's pipeline, from ``data.augment``.

    ``offered``: the plugins' augmentations by name; ``resolve`` maps a
    configured modality name or alias to the canonical name. Every error is a
    ConfigError naming the key (``data.augment.t1[0]``). Each pipeline is
    tried once on an image of the modality's input shape (every random step
    made to fire), so a transform that fails or changes the shape is refused
    now, not in a DataLoader worker.
    """
    pipelines: dict[str, Pipeline] = {}
    for configured, value in settings.items():
        key = f"data.augment.{configured}"
        try:
            name = resolve(str(configured)) if resolve is not None else str(configured).lower()
        except UmbrellaError as exc:
            raise ConfigError(f"{key}: {exc}") from None
        spec = specs.get(name)
        if spec is None:
            raise ConfigError(
                f"{key}: {configured!r} is not a modality of this run ({', '.join(specs)})"
            )
        steps = []
        for where, entry in _entries(value, key, spec):
            augmentation = offered.get(entry["name"])
            if augmentation is None:
                augmentation = monai_augmentation(entry["name"], where, offered)
            elif augmentation.modalities and name not in augmentation.modalities:
                raise ConfigError(
                    f"{where}: {augmentation.name} is for {', '.join(augmentation.modalities)}, "
                    f"not {name}"
                )
            steps.append(_step(where, entry, augmentation, spec))
        if steps:
            pipeline = Pipeline(name, tuple(steps), frames_as_channels=spec.ndim == 4)
            _try(pipeline, spec)
            pipelines[name] = pipeline
    return pipelines


def _try(pipeline: Pipeline, spec: ModalitySpec) -> None:
    import copy

    import torch

    image = torch.zeros((spec.channels, *spec.shape), dtype=torch.float32)
    image[(slice(None), *(slice(s // 4, 3 * s // 4) for s in spec.shape))] = 1.0
    x = fold(image) if pipeline.frames_as_channels else image
    for step in pipeline.steps:
        transform = copy.deepcopy(step.transform)
        if hasattr(transform, "prob"):
            transform.prob = 1.0
        try:
            out = transform(x)
        except Exception as exc:  # noqa: BLE001
            raise ConfigError(
                f"{step.key}: {step.name} failed on a {spec.name} image of shape "
                f"{tuple(x.shape)}: {type(exc).__name__}: {exc}"
            ) from None
        if tuple(getattr(out, "shape", ())) != tuple(x.shape):
            raise ConfigError(
                f"{step.key}: {step.name} changes a {spec.name} image's shape from "
                f"{tuple(x.shape)} to {tuple(getattr(out, 'shape', ()))}; an augmentation "
                "must keep it (the patch embedder expects the modality's input shape)"
            )
        x = plain_tensor(out)
    if pipeline.frames_as_channels:
        unfold(x, image.shape)


def run_pipelines(
    config: Any,
    pm: Any,
    specs: Mapping[str, ModalitySpec],
    records: Iterable[Any],
    log: Any,
    *,
    encode: Callable[[Any], Any] | None = None,
) -> dict[str, Pipeline]:
    """The run's pipelines from ``data.augment``, checked against its training ``records``.

    ``encode`` (the run's record encoder): also check that each record whose
    sides a mirror swaps still fits the run with its sides swapped. Nothing is
    imported (MONAI takes seconds) when no modality is augmented.
    """
    settings = {k: v for k, v in config.data.augment.items() if not _is_off(v)}
    if not settings:
        return {}
    from umbrella_core.augmentation.laterality import check_laterality, check_swapped, skipped_steps

    pipelines = build_pipelines(
        settings,
        specs,
        pm.augmentations(),
        resolve=lambda name: pm.resolve_modality(name).item.name,
    )
    training = [r for r in records if r.split == "train"]
    check_laterality(pipelines, training, config.data.laterality)
    if encode is not None:
        check_swapped(pipelines, training, config.data.laterality, encode)
    for name, pipeline in pipelines.items():
        steps = ", ".join(step.name for step in pipeline.steps)
        log(f"augmenting {name} training images: {steps} (seeded by run seed, epoch and draw)")
    for line in skipped_steps(pipelines, training):
        log(line)
    return pipelines
