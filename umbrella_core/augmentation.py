"""Random augmentation of training images, per modality, with MONAI transforms (since 0.3).

Deterministic preprocessing is the modality's ``load`` (and the preprocessed
cache keeps its result); augmentation is a stage after it, drawn anew for
every sample in the DataLoader workers, as MONAI's ``CacheDataset`` pattern
does. It is configured per modality::

    data:
      augment:
        t1: [{name: RandAffine, prob: 0.5, rotate_range: 0.1}, {name: RandBiasField}]
        dmri: light                      # the modality's preset (ModalitySpec.augment_presets)
        fmri: [light, {name: RandGaussianNoise, std: 0.05}]

A name is an augmentation a plugin offers (``umbrella_augmentations``, which
win over MONAI's names) or any MONAI array transform (``monai.transforms``).
Unknown names, unknown arguments and transforms that change the image's shape
are config errors naming the key. A 4D image (x, y, z, t) is augmented with
its frames as channels, so a spatial transform moves every frame of a window
alike.

Answers that depend on the side. The first spatial axis is x (left to right:
every loader reorients to RAS), so a flip along it mirrors the brain. Each
augmentation says whether its arguments can ``mirror`` x or ``turn`` it onto
another axis (a 90° rotation). For a training record that such a transform
would touch, its laterality decides (the record's own
:attr:`~umbrella_core.types.StudyRecord.laterality`, as its reader knows the
task; else ``data.laterality.<study>``; else ``refuse`` when a turn names a
side): ``refuse`` is a config error naming the key and the record, ``swap``
swaps left and right in its turns whenever its images were mirrored,
``ignore`` lets it be (:mod:`umbrella_core.laterality`).

Answers that depend on position or intensity. A record's ``forbid_augment``
names transforms that must not touch its images (``spatial`` stands for every
transform that moves voxels: a coordinate or a volume moves with them); they
are skipped for that record's images and applied to the others', and the
run's start says how many records skip what.

Held-out records are never augmented: only the training dataset is wrapped
(:mod:`umbrella_core.data.augmented`).
"""

from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any

import attrs

from umbrella_core.errors import ConfigError, UmbrellaError
from umbrella_core.types import ModalitySpec

__all__ = [
    "Augmentation",
    "AugmentStep",
    "Pipeline",
    "build_pipelines",
    "fold",
    "unfold",
    "SIDES",
    "SPATIAL",
]

#: What an augmentation can do to the left-right axis: nothing, mirror it, or
#: turn it onto another axis (no rewrite of an answer can follow that).
SIDES = ("keep", "mirror", "turn")
_OFF = ("", "no", "off", "none", "false")
#: In a record's ``forbid_augment``: every transform that moves voxels.
SPATIAL = "spatial"


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
    modalities: tuple[str, ...] = attrs.field(default=(), converter=tuple)
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


@attrs.frozen
class AugmentStep:
    """One configured transform: where it was configured, what it is, its instance."""

    key: str
    name: str
    arguments: Mapping[str, Any]
    sides: str
    transform: Any = attrs.field(eq=False, repr=False)
    mirrored: Callable[[Any], bool] | None = attrs.field(default=None, eq=False, repr=False)
    spatial: bool = False

    def forbidden_by(self, forbid: Collection[str]) -> bool:
        """Whether a record's ``forbid_augment`` names this step (``spatial``: a spatial one)."""
        return self.name in forbid or (self.spatial and SPATIAL in forbid)


@attrs.frozen
class Pipeline:
    """A modality's augmentation: its steps in order; frames fold into channels when 4D."""

    modality: str
    steps: tuple[AugmentStep, ...]
    frames_as_channels: bool = False

    @property
    def can_mirror(self) -> bool:
        return any(step.sides != "keep" for step in self.steps)

    def apply(
        self, image: Any, seed: Sequence[int], forbid: Collection[str] = ()
    ) -> tuple[Any, bool]:
        """``(augmented image, whether x ended up mirrored)`` for one image.

        Step ``k`` draws from ``SeedSequence([*seed, k])`` (its MONAI random
        state and torch's generator, restored afterwards): the same seed gives
        the same image in any process, whatever ran before, and changing one
        step's arguments, or skipping it, leaves the other steps' draws as they
        were. Steps that ``forbid`` (a record's ``forbid_augment``) names are skipped.
        """
        import numpy as np
        import torch

        x = fold(image) if self.frames_as_channels else image
        mirrored = False
        for number, step in enumerate(self.steps):
            if forbid and step.forbidden_by(forbid):
                continue
            state = int(np.random.SeedSequence([*seed, number]).generate_state(1)[0])
            transform = step.transform
            if hasattr(transform, "set_random_state"):
                transform.set_random_state(seed=state)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(state)
                out = transform(x)
            if step.sides == "mirror":
                # Two mirrors undo each other.
                mirrored ^= bool(step.mirrored(transform)) if step.mirrored else True
            x = _plain(out)
        return (unfold(x, image.shape) if self.frames_as_channels else x), mirrored


def fold(image: Any) -> Any:
    """``(c, x, y, z, t)`` to ``(c * t, x, y, z)``: frames as channels, moved alike."""
    c, *spatial, t = image.shape
    return image.permute(0, 4, 1, 2, 3).reshape(c * t, *spatial)


def unfold(image: Any, shape: Sequence[int]) -> Any:
    """:func:`fold` undone, to ``shape`` ``(c, x, y, z, t)``."""
    c, *spatial, t = shape
    return image.reshape(c, t, *spatial).permute(0, 2, 3, 4, 1).contiguous()


def _plain(out: Any) -> Any:
    """A float32, contiguous torch tensor (MONAI returns MetaTensors, some numpy arrays)."""
    import torch

    if hasattr(out, "as_tensor"):
        out = out.as_tensor()
    return torch.as_tensor(out, dtype=torch.float32).contiguous()


# -- sides of MONAI's transforms ---------------------------------------------


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


def _monai_augmentation(name: str, key: str, offered: Iterable[str]) -> Augmentation:
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


# -- building the pipelines ---------------------------------------------------


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


def _is_monai_affine(augmentation: Augmentation) -> bool:
    build = augmentation.build
    return getattr(build, "__name__", "") == "RandAffine" and getattr(
        build, "__module__", ""
    ).startswith("monai.")


def _fixed_grid(
    augmentation: Augmentation, arguments: Mapping[str, Any], spec: ModalitySpec
) -> dict[str, Any]:
    """Arguments that let MONAI's RandAffine build its sampling grid once, not per call.

    Told the image's size (every image of a modality has its input shape), it
    keeps the grid, for 4 floats per voxel of memory.
    """
    if _is_monai_affine(augmentation) and not {"spatial_size", "cache_grid"} & set(arguments):
        return {"spatial_size": tuple(spec.shape[:3]), "cache_grid": True}
    return {}


def _in_float32(transform: Any) -> None:
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
    try:
        transform = augmentation.build(**arguments, **_fixed_grid(augmentation, arguments, spec))
        if _is_monai_affine(augmentation):
            _in_float32(transform)
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
                augmentation = _monai_augmentation(entry["name"], where, offered)
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
        x = _plain(out)
    if pipeline.frames_as_channels:
        unfold(x, image.shape)


def run_pipelines(
    config: Any, pm: Any, specs: Mapping[str, ModalitySpec], records: Iterable[Any], log: Any
) -> dict[str, Pipeline]:
    """The run's pipelines from ``data.augment``, checked against its training ``records``.

    Nothing is imported (MONAI takes seconds) when no modality is augmented.
    """
    settings = {k: v for k, v in config.data.augment.items() if not _is_off(v)}
    if not settings:
        return {}
    from umbrella_core.laterality import check_laterality

    pipelines = build_pipelines(
        settings,
        specs,
        pm.augmentations(),
        resolve=lambda name: pm.resolve_modality(name).item.name,
    )
    training = [r for r in records if r.split == "train"]
    check_laterality(pipelines, training, config.data.laterality)
    for name, pipeline in pipelines.items():
        steps = ", ".join(step.name for step in pipeline.steps)
        log(f"augmenting {name} training images: {steps} (seeded by run seed, epoch and draw)")
    for line in skipped_steps(pipelines, training):
        log(line)
    return pipelines


def _steps_of(pipelines: Mapping[str, Pipeline], modality: str) -> tuple[AugmentStep, ...]:
    pipeline = pipelines.get(modality)
    return pipeline.steps if pipeline is not None else ()


def skipped_steps(pipelines: Mapping[str, Pipeline], records: Iterable[Any]) -> list[str]:
    """One line per modality and step that some records' ``forbid_augment`` skips, counted."""
    counts: dict[tuple[str, str], int] = {}
    for record in records:
        if not record.forbid_augment:
            continue
        skipped = {
            (image.modality, step.name)
            for image in record.images
            for step in _steps_of(pipelines, image.modality)
            if step.forbidden_by(record.forbid_augment)
        }
        for key in skipped:
            counts[key] = counts.get(key, 0) + 1
    return [
        f"{modality}: {name} skipped for the images of {count} training record(s) "
        "that forbid it (forbid_augment)"
        for (modality, name), count in counts.items()
    ]
