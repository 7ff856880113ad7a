"""What a modality is (``umbrella_modalities``): its spec, demo, windows and phantom files."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import attrs

from umbrella_core.types._convert import as_tuple, lowered


def positive_settings(
    modality: str, settings: Mapping[str, Any], known: Sequence[str]
) -> dict[str, float]:
    """Check a ``ModalitySpec.configure`` mapping whose settings are positive numbers.

    Raises:
        ValueError: A setting not in ``known`` (the message lists them), or a
            value that is not a positive number.
    """
    out = {}
    for key, value in settings.items():
        if key not in known:
            raise ValueError(
                f"unknown setting {key!r}; {modality} takes: {', '.join(sorted(known))}"
            )
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{key} must be a positive number, got {value!r}")
        out[key] = float(value)
    return out


def _int_tuple(value: Sequence[int]) -> tuple[int, ...]:
    return tuple(int(v) for v in value)


def _aliases(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(lowered(a) for a in values)


def _check_geometry(instance: ModalitySpec, attribute: attrs.Attribute[Any], value: Any) -> None:
    ndim = instance.ndim
    if ndim not in (3, 4):
        raise ValueError(f"modality {instance.name!r}: ndim must be 3 or 4, got {ndim}")
    if len(instance.shape) != ndim:
        raise ValueError(
            f"modality {instance.name!r}: shape {instance.shape} must have {ndim} entries"
        )
    if len(instance.patch_size) != ndim:
        raise ValueError(
            f"modality {instance.name!r}: patch_size {instance.patch_size} must have {ndim} entries"
        )
    for size, patch in zip(instance.shape, instance.patch_size, strict=False):
        if patch <= 0 or size <= 0 or size % patch:
            raise ValueError(
                f"modality {instance.name!r}: shape {instance.shape} is not divisible by "
                f"patch_size {instance.patch_size}"
            )


@attrs.frozen(kw_only=True)
class PhantomFile:
    """One file of a synthetic sample: ``data`` (numpy array in file layout) and its affine.

    ``suffix`` names the file (``T1w``, ``bold``, ``FA``); a sample with several
    files (one per dMRI map, say) lists them in channel order. ``tr`` is the
    repetition time in seconds of a 4D series, written to the header.
    ``measure`` is the number that :attr:`Demo.measure` asks about (the
    lesion's diameter, say), given on the sample's first file.
    """

    suffix: str
    data: Any
    affine: Any
    tr: float | None = None
    measure: float | None = None


def _optional_shape(value: Any) -> tuple[int, ...] | None:
    return None if value is None else _int_tuple(value)


@attrs.frozen(kw_only=True)
class Demo:
    """How the built-in demo (and the conformance kit) makes samples of a modality.

    Attributes:
        phantom: ``phantom(spec, rng, label) -> list[PhantomFile]``: a synthetic
            sample whose content depends on ``label`` (one of ``labels``).
            None: the demo skips the modality, saying so.
        labels: The answers the phantom task can have.
        question: The question whose answer is the phantom's label.
        measure: A question whose answer is a number the phantom reports
            (:attr:`PhantomFile.measure`), such as the lesion's position; the
            demo asks it beside ``question``, so a run shows a numeric metric
            (MAE) too. Empty: none.
        measure_unit: The unit written after that number (``cm``).
        shape: Input shape the demo and the kit use (small, for CPU); None: the
            modality's ``shape``.
        patch_size: Patch size at that shape; None: the modality's ``patch_size``.
    """

    phantom: Callable[..., Any] | None = attrs.field(default=None, eq=False, repr=False)
    labels: tuple[str, ...] = attrs.field(default=("left", "right"), converter=as_tuple)
    question: str = "Which hemisphere holds the lesion?"
    measure: str = ""
    measure_unit: str = ""
    shape: tuple[int, ...] | None = attrs.field(default=None, converter=_optional_shape)
    patch_size: tuple[int, ...] | None = attrs.field(default=None, converter=_optional_shape)


@attrs.frozen(kw_only=True)
class Windows:
    """How a file holding several model inputs along its last axis (an fMRI series) is cut.

    Each file gives ``1 + (frames - shape[-1]) // stride`` samples, window
    ``i`` being frames ``i * stride ... i * stride + shape[-1] - 1``.

    Attributes:
        series: ``series(spec, paths) -> numpy.ndarray`` of shape
            ``(channels, *shape[:-1], frames)``: the whole file preprocessed once
            (per-subject statistics over all frames).
        frames: ``frames(spec, paths) -> int``: the frames in the file, from the
            header without decoding the data.
        stride: Frames between the starts of consecutive windows. None: one
            window per file, read with ``load`` (the demo's short files).
        window: ``window(spec, paths, index) -> numpy.ndarray`` of shape
            ``(channels, *shape)``: window ``index`` read without preprocessing
            the whole file, equal to ``series(spec, paths)[...,
            spec.window_slice(index)]``. Used when there is no preprocessed
            cache; None: the core cuts the window from ``series``. New in 0.3.
    """

    series: Callable[..., Any] = attrs.field(eq=False, repr=False)
    frames: Callable[..., int] = attrs.field(eq=False, repr=False)
    stride: int | None = attrs.field(default=None, converter=attrs.converters.optional(int))
    window: Callable[..., Any] | None = attrs.field(default=None, eq=False, repr=False)

    @stride.validator
    def _positive(self, attribute: attrs.Attribute[Any], value: int | None) -> None:
        if value is not None and value <= 0:
            raise ValueError(f"window stride must be positive, got {value}")


@attrs.frozen(kw_only=True)
class ModalitySpec:
    """Everything the core needs to know about one imaging modality.

    Attributes:
        name: Canonical lower-case name carried in every batch (``t1``).
        ndim: Spatial dimensions of one channel: 3 for (x, y, z), 4 for (x, y, z, t).
        shape: Model input shape per channel, e.g. ``(96, 96, 96)``.
        patch_size: Patch size per axis; ``shape`` must be divisible by it.
        channels: Channels per image (e.g. 2 for dMRI FA and MD maps).
        load: ``load(spec, paths) -> numpy.ndarray`` of dtype float32 and shape
            ``(channels, *shape)``: reads the file(s), reorients, brings the volume
            to ``shape`` and normalises intensity. Must raise
            :class:`umbrella_core.errors.DataError` naming the file on bad input.
        aliases: Other names users may type (``T1w``, ``sMRI``); matched case-insensitively.
        file_patterns: Glob patterns of files of this modality (``*_T1w.nii.gz``).
        description: One line for ``umbrella plugins``.
        demo: The phantom, its question(s) and the small geometry of the
            built-in demo (:class:`Demo`); None: the demo skips the modality.
        windows: For modalities whose files hold several model inputs along
            their last axis (:class:`Windows`); None: one input per file (``load``).
        companions: ``companions(spec, paths) -> list[str]``: files the loader
            reads besides ``paths`` because it finds them next to them (a brain
            mask beside a T1, ``.bval``/``.bvec`` beside a DWI series, a JSON
            sidecar); only those that exist. The preprocessed cache keys on
            them too, so adding, editing or removing one is not served stale.
        configure: ``configure(spec, settings) -> ModalitySpec``: the spec with
            the run's preprocessing settings applied (``data.preprocessing.<name>``
            in the config, e.g. ``{"spacing": 1.0}`` for ``t1``). Raises
            ValueError naming an unknown setting or a bad value. None: the
            modality takes no settings.
        augment_presets: Named augmentation lists (``{"light": ({"name":
            "RandAffine", "prob": 0.5, ...}, ...)}``) that ``data.augment.<name>:
            light`` stands for (:mod:`umbrella_core.augmentation`). Since 0.3.

    Changed in 0.3: the demo fields (``phantom``, ``phantom_labels``,
    ``phantom_question``, ``phantom_measure``, ``demo_shape``, ...) are
    grouped in ``demo``, and ``series``, ``frames`` and ``window_stride`` in
    ``windows``.
    """

    name: str = attrs.field(converter=lowered)
    ndim: int = attrs.field(converter=int)
    shape: tuple[int, ...] = attrs.field(converter=_int_tuple, validator=_check_geometry)
    patch_size: tuple[int, ...] = attrs.field(converter=_int_tuple, validator=_check_geometry)
    channels: int = attrs.field(default=1, converter=int)
    load: Callable[..., Any] = attrs.field(eq=False, repr=False)
    aliases: tuple[str, ...] = attrs.field(default=(), converter=_aliases)
    file_patterns: tuple[str, ...] = attrs.field(default=(), converter=as_tuple)
    description: str = ""
    demo: Demo | None = None
    windows: Windows | None = None
    companions: Callable[..., Any] | None = attrs.field(default=None, eq=False, repr=False)
    configure: Callable[..., Any] | None = attrs.field(default=None, eq=False, repr=False)
    augment_presets: Mapping[str, tuple[Mapping[str, Any], ...]] = attrs.field(
        factory=dict, eq=False, repr=False
    )

    @property
    def grid(self) -> tuple[int, ...]:
        """Number of patches along each axis."""
        return tuple(s // p for s, p in zip(self.shape, self.patch_size, strict=False))

    @property
    def num_tokens(self) -> int:
        """Image tokens one image of this modality becomes (invariant I3)."""
        return math.prod(self.grid)

    @property
    def windowed(self) -> bool:
        """Whether a file gives several model inputs (windows of its last axis)."""
        return self.windows is not None and self.windows.stride is not None

    def window_count(self, frames: int) -> int:
        """Windows of ``shape[-1]`` frames, ``windows.stride`` apart, in ``frames`` frames."""
        length = self.shape[-1]
        if frames < length:
            return 0
        stride = self._window_stride()
        if stride is None:
            return 1
        return 1 + (frames - length) // stride

    def window_start(self, index: int) -> int:
        stride = self._window_stride()
        return index * (0 if stride is None else stride)

    def _window_stride(self) -> int | None:
        """``windows.stride``: None when the modality is not windowed."""
        return None if self.windows is None else self.windows.stride

    def window_slice(self, index: int) -> slice:
        """The frames of window ``index``, for indexing the last axis of a series."""
        start = self.window_start(index)
        return slice(start, start + self.shape[-1])

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one model-ready image: ``(channels, *shape)``."""
        return (self.channels, *self.shape)

    def with_geometry(
        self, shape: Sequence[int] | None = None, patch_size: Sequence[int] | None = None
    ) -> ModalitySpec:
        """A copy with another input shape and/or patch size (validated)."""
        changes: dict[str, Any] = {}
        if shape is not None:
            changes["shape"] = shape
        if patch_size is not None:
            changes["patch_size"] = patch_size
        return attrs.evolve(self, **changes)

    def for_demo(self) -> ModalitySpec:
        """A copy with the demo geometry (``demo.shape``/``demo.patch_size``) where declared.

        Demo files are short: they give one window each (``load``).
        """
        spec = self
        if self.demo is not None:
            spec = self.with_geometry(self.demo.shape, self.demo.patch_size)
        if spec.windows is None:
            return spec
        return attrs.evolve(spec, windows=attrs.evolve(spec.windows, stride=None))
