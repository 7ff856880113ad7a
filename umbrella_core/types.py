"""Value classes that plugins return and the core passes around.

They are plain attrs classes and import neither torch nor numpy, so that
``import umbrella_core`` and ``umbrella plugins`` stay fast.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs

__all__ = [
    "Command",
    "ModalitySpec",
    "Demo",
    "Windows",
    "PhantomFile",
    "ImageRef",
    "Turn",
    "StudyRecord",
    "LossTerm",
    "MetricFamily",
    "QuestionAnswers",
    "Baseline",
    "IMAGE_PLACEHOLDER",
    "positive_settings",
]

#: The placeholder that marks where an image goes in a user turn.
IMAGE_PLACEHOLDER = "<image>"


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


def _lower(value: str) -> str:
    return str(value).strip().lower()


def _int_tuple(value: Sequence[int]) -> tuple[int, ...]:
    return tuple(int(v) for v in value)


def _check_geometry(instance: ModalitySpec, attribute: attrs.Attribute, value: Any) -> None:
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
    labels: tuple[str, ...] = attrs.field(default=("left", "right"), converter=tuple)
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
    def _positive(self, attribute: attrs.Attribute, value: int | None) -> None:
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

    name: str = attrs.field(converter=_lower)
    ndim: int = attrs.field(converter=int)
    shape: tuple[int, ...] = attrs.field(converter=_int_tuple, validator=_check_geometry)
    patch_size: tuple[int, ...] = attrs.field(converter=_int_tuple, validator=_check_geometry)
    channels: int = attrs.field(default=1, converter=int)
    load: Callable[..., Any] = attrs.field(eq=False, repr=False)
    aliases: tuple[str, ...] = attrs.field(
        default=(), converter=lambda v: tuple(_lower(a) for a in v)
    )
    file_patterns: tuple[str, ...] = attrs.field(default=(), converter=tuple)
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
        if not self.windowed:
            return 1
        return 1 + (frames - length) // self.windows.stride

    def window_start(self, index: int) -> int:
        return index * (self.windows.stride if self.windowed else 0)

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


def _paths(value: str | os.PathLike | Sequence[str | os.PathLike]) -> tuple[str, ...]:
    if type(value) in (list, tuple) and all(type(v) is str for v in value):
        # A reader's list of strings: the isinstance checks below against the
        # os.PathLike ABC were a tenth of reading a 100,000-record manifest.
        return tuple(value)
    if isinstance(value, (str, os.PathLike)):
        return (os.fspath(value),)
    return tuple(os.fspath(v) for v in value)


@attrs.frozen(kw_only=True)
class ImageRef:
    """One image of a record: its modality name and its file(s), one per channel or one in all."""

    modality: str = attrs.field(converter=_lower)
    paths: tuple[str, ...] = attrs.field(converter=_paths)


_ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}


def _laterality(_: Any, attribute: Any, value: str | None) -> None:
    if value not in (None, "refuse", "swap", "ignore"):
        raise ValueError(f"laterality must be refuse, swap or ignore, got {value!r}")


def _role(value: str) -> str:
    role = _ROLES.get(_lower(value))
    if role is None:
        raise ValueError(f"role must be user or assistant, got {value!r}")
    return role


@attrs.frozen(kw_only=True)
class Turn:
    """One turn of a conversation. ``human``/``gpt`` are accepted as ``user``/``assistant``."""

    role: str = attrs.field(converter=_role)
    content: str = attrs.field(converter=str)


@attrs.frozen(kw_only=True)
class StudyRecord:
    """One training sample as a study reader yields it.

    Attributes:
        subject: Subject identifier.
        images: The images, in the order their placeholders appear in the conversation.
        turns: The conversation; at least one assistant turn.
        study: Name of the study the record comes from.
        session: Session identifier, if any.
        split: ``train``, ``validation`` or ``test``; None when the study gives
            none. Readers leave it None unless the data (a file's field, a
            table's column, a study option) names one; UMBRELLA then assigns
            every record a split when it reads the studies
            (:func:`umbrella_core.data.split.assign_splits`, invariant I10), so
            after ``read_studies`` it is never None.
        family: Family identifier (HCP ``Family_ID``, ABCD ``rel_family_id``),
            if the study knows one: a family's subjects are kept on one side of
            a split.
        site: Acquisition site, if known (``data.split.by: site`` keeps each
            site on one side).
        phenotypes: Phenotype values (age, sex, diagnosis, ...).
        source: Where the record was read (``manifest.jsonl:12``), for error messages.
        laterality: What a left-right mirror of its images does to its answer
            (since 0.3): ``refuse`` (it changes it: such augmentation is a
            config error), ``swap`` (swap left and right in its turns when
            mirrored), ``ignore`` (the answer does not depend on it); None: the
            study's ``data.laterality``, else ``refuse`` when a turn names a side.
        forbid_augment: Augmentations (by name; ``spatial``: every one that
            moves voxels) skipped for its images, because they would change its
            answer (a coordinate, a volume) (since 0.3).

    A record about several subjects (a comparison of two scans) names them
    joined by ``+`` in ``subject`` (``sub-01+sub-02``; :attr:`subjects` splits
    them) and, where it has them, their families and sites in the same order
    in ``family`` and ``site`` (or one value for all). Its subjects are kept
    on one side of a split together.
    """

    subject: str = attrs.field(converter=str)
    images: tuple[ImageRef, ...] = attrs.field(converter=tuple)
    turns: tuple[Turn, ...] = attrs.field(converter=tuple)
    study: str = "default"
    session: str | None = None
    split: str | None = attrs.field(default=None, converter=attrs.converters.optional(_lower))
    family: str | None = attrs.field(default=None, converter=attrs.converters.optional(str))
    site: str | None = attrs.field(default=None, converter=attrs.converters.optional(str))
    phenotypes: Mapping[str, Any] = attrs.field(factory=dict)
    source: str = ""
    laterality: str | None = attrs.field(default=None, validator=_laterality)
    forbid_augment: tuple[str, ...] = attrs.field(default=(), converter=tuple)

    @property
    def subjects(self) -> tuple[str, ...]:
        """The subject ids the record is about (``subject`` split at ``+``)."""
        return tuple(self.subject.split("+"))

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(image.modality for image in self.images)

    @property
    def modality_key(self) -> str:
        """The modalities of the record joined by ``+`` (``t1`` or ``t1+dmri``), for logging."""
        return "+".join(dict.fromkeys(self.modalities)) or "text"


@attrs.frozen(kw_only=True)
class LossTerm:
    """A term added to the unified next-token loss.

    ``compute(outputs, batch)`` returns a scalar tensor; ``outputs`` is the
    model's :class:`umbrella_core.model.umbrella.UmbrellaOutput` (the NLL,
    ``token_loss`` per position, image features per modality) and ``batch``
    the collated batch (a :class:`umbrella_core.data.batch.Batch`:
    ``input_ids``, ``labels``, ``pixel_values``, ``image_places``, ...). The
    term is multiplied by ``weight`` and logged under ``loss/<name>``.

    Training computes logits only where labels are learned (full-vocabulary
    logits at every position cost ~1 GB per 1,000-token sample with a
    262k-token vocabulary): ``outputs.logits`` is None unless a term sets
    ``needs_logits``, which makes every training forward compute and keep them.
    """

    name: str = attrs.field(converter=_lower)
    compute: Callable[..., Any] = attrs.field(eq=False, repr=False)
    weight: float = attrs.field(default=1.0, converter=float)
    needs_logits: bool = attrs.field(default=False, converter=bool)


#: How a metric family gets the model's answers: ``candidates`` scores every
#: answer the question has in the run (one teacher-forced pass, no sampling);
#: ``generate`` decodes the answer greedily.
SCORINGS = ("candidates", "generate")


@attrs.frozen(kw_only=True)
class QuestionAnswers:
    """The held-out answers to one question of one modality key, as a metric family scores them.

    Attributes:
        question: The question (the last user turn, image placeholders removed).
        modality_key: The records' modality key (``t1``, ``t1+dmri``).
        references: The reference answer of each held-out sample.
        predictions: The model's answer to each: the most probable candidate
            (``candidates`` scoring) or the greedy decoding (``generate``).
        classes: The candidate answers: every distinct answer to the question
            over the run's records, sorted (``candidates`` scoring; else empty).
        probabilities: Per sample, the model's probability of each class
            (softmax over the candidates' summed log-probabilities); None with
            ``generate`` scoring.
        train_references: The training records' answers to the question, for
            references such as the majority class or the training mean.
        sources: Where each sample's record was read, for reports.
        generated: The greedy answer to each, decoded and stripped as
            ``umbrella generate`` prints it, whatever the scoring (with
            ``generate`` scoring it equals ``predictions``); empty where no
            answer was generated (a value built by hand).
        ended: Per generated answer, whether it ended within the question's
            token budget (decoding stopped at eos or the chat template's
            end-of-turn). A model that never ends its turn can still choose
            the right candidate: the evaluation reports both, and adds
            ``ended`` and ``parsed`` to every family's metrics. (``generated``
            and ``ended``: since 0.4.)
    """

    question: str
    modality_key: str
    references: tuple[str, ...] = attrs.field(converter=tuple)
    predictions: tuple[str, ...] = attrs.field(converter=tuple)
    classes: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    probabilities: tuple[tuple[float, ...], ...] | None = None
    train_references: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    sources: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    generated: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    ended: tuple[bool, ...] = attrs.field(default=(), converter=lambda v: tuple(bool(e) for e in v))

    @ended.validator
    def _one_per_generated(self, attribute: attrs.Attribute, value: tuple[bool, ...]) -> None:
        given = len(self.generated)
        if len(value) != given or given and given != len(self.references):
            raise ValueError(
                f"{len(self.references)} references, {len(self.generated)} generated answers "
                f"and {len(value)} ended flags: give one generated answer and one flag per "
                "reference, or none"
            )


def _scoring(instance: Any, attribute: attrs.Attribute, value: str) -> None:
    if value not in SCORINGS:
        raise ValueError(f"scoring must be one of {', '.join(SCORINGS)}, got {value!r}")


@attrs.frozen(kw_only=True)
class MetricFamily:
    """How the held-out answers to a kind of question are scored (``umbrella_metrics``).

    Each held-out question is scored by the first family whose ``applies``
    accepts it: plugins' families before the built-in ``categorical``,
    ``numeric`` and ``text`` ones (which are ``trylast``).

    Attributes:
        name: Shown in tables and metric names (``categorical``, ``mmse``).
        applies: ``applies(question, answers) -> bool``, with every answer the
            question has over the run's records (all splits).
        compute: ``compute(answers: QuestionAnswers) -> Mapping``: metric name
            to a number (or None where undefined), plus optionally
            ``reference`` (a mapping of the figures a reader compares with, such
            as chance) and any JSON-serialisable details (a confusion matrix).
        scoring: ``candidates`` (the model's probability of every answer the
            question has: for few-valued answers) or ``generate`` (greedy
            decoding: numbers, free text).
        table: ``table(metrics) -> [(label, value, reference), ...]``, the rows
            ``umbrella evaluate`` prints, as text; default: every numeric metric.
        figure: ``figure(answers, metrics) -> matplotlib Figure | None``, saved
            as PNG by ``umbrella evaluate`` and logged to TensorBoard.
    """

    name: str = attrs.field(converter=_lower)
    applies: Callable[[str, Sequence[str]], bool] = attrs.field(eq=False, repr=False)
    compute: Callable[[QuestionAnswers], Mapping[str, Any]] = attrs.field(eq=False, repr=False)
    scoring: str = attrs.field(default="generate", validator=_scoring)
    table: Callable[[Mapping[str, Any]], Sequence[tuple[str, str, str]]] | None = attrs.field(
        default=None, eq=False, repr=False
    )
    figure: Callable[[QuestionAnswers, Mapping[str, Any]], Any] | None = attrs.field(
        default=None, eq=False, repr=False
    )


@attrs.frozen(kw_only=True)
class Baseline:
    """A simple model's view of an image, to show beside the VLM's figures (``umbrella_baselines``).

    The core fits a linear model on the features (logistic regression for a
    categorical question, ridge regression for a numeric one) on the run's
    training split, chooses its regularisation on the validation split and
    scores it on the held-out samples the VLM's table uses
    (:mod:`umbrella_core.evaluation.baselines`). For each modality key and
    question the first baseline whose ``applies`` accepts the spec of every
    image of the samples is used: plugins' baselines before the built-in
    ``regional`` one (``trylast``).

    Attributes:
        name: Shown in tables and metric names (``regional``); unique over the
            installed plugins.
        description: One line: what the features are, for the table's header,
            ``metrics.json`` and ``umbrella plugins``.
        applies: ``applies(spec) -> bool``: whether it represents images of
            this :class:`ModalitySpec` (dispatch on ``ndim``, ``channels`` and
            ``shape``; a plugin's baseline for its own modality may test the name).
        features: ``features(spec, image) -> numpy.ndarray``: one image, a
            float32 array of shape ``spec.input_shape`` read as the VLM reads
            it, to a 1-D array of finite numbers whose length depends only on
            the spec. A sample with several images gets their features
            concatenated in placeholder order.
        describe: ``describe(spec) -> str``: what the features of an image of
            this spec are (``64 regional means (4x4x4 grid, 1 channel)``);
            None: ``description``.

    Since: 0.4
    """

    name: str = attrs.field(converter=_lower)
    description: str = ""
    applies: Callable[[ModalitySpec], bool] = attrs.field(eq=False, repr=False)
    features: Callable[[ModalitySpec, Any], Any] = attrs.field(eq=False, repr=False)
    describe: Callable[[ModalitySpec], str] | None = attrs.field(default=None, eq=False, repr=False)


@attrs.frozen(kw_only=True)
class Command:
    """A subcommand of ``umbrella`` (``umbrella_commands``).

    Attributes:
        name: What the user types after ``umbrella`` (``serve``); unique over
            the installed plugins.
        help: One line for ``umbrella --help``.
        add_arguments: ``add_arguments(parser)``: adds the command's arguments to
            its ``argparse.ArgumentParser``.
        run: ``run(args) -> int``: does the work with the parsed
            ``argparse.Namespace``; returns the exit status. An
            :class:`~umbrella_core.errors.UmbrellaError` it raises becomes one line
            on stderr (exit status 2; the traceback with ``umbrella --debug``).
        description: The text of ``umbrella NAME --help`` (default: ``help``).

    Every ``umbrella`` invocation builds every command's parser: import what
    ``run`` needs inside it, not at the plugin module's top.

    Since: 0.6
    """

    name: str = attrs.field(converter=_lower)
    help: str
    add_arguments: Callable[[Any], None] = attrs.field(eq=False, repr=False)
    run: Callable[[Any], int] = attrs.field(eq=False, repr=False)
    description: str | None = None
