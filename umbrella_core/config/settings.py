"""The run configuration's classes, one per section, each setting with its default."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from umbrella_core.config.checks import (
    evaluation_settings,
    fraction,
    known_baselines,
    known_trackers,
    not_blank,
    not_negative,
    one_of,
    positive,
    sampling_weights,
    seed,
    tracker_names,
    unit_interval,
)
from umbrella_core.errors import ConfigError
from umbrella_core.types._convert import as_tuple

__all__ = [
    "StudyConfig",
    "SplitConfig",
    "LoraConfig",
    "ModelConfig",
    "DataConfig",
    "TrainerConfig",
    "RunConfig",
    "RANDOM_START_LEARNING_RATE",
    "PRETRAINED_LEARNING_RATE",
    "learning_rate",
    "chosen_learning_rate",
]

#: ``trainer.learning_rate`` of a run whose model starts from random weights
#: (the built-in ``tiny``): nothing is worth preserving.
RANDOM_START_LEARNING_RATE = 1e-3
#: ``trainer.learning_rate`` of a run with a pretrained language model (composed,
#: or a LLaVA / UMBRELLA checkpoint). At 1e-3 with the demo's batches of 8, the
#: new image path of Gemma 3 270M never learned to tell the dMRI hemispheres
#: apart through the frozen model (60 steps, 60 % of a batch right); at 3e-4 it
#: did within 40 (SmolLM2 too): ``benchmarks/results/real_lm.md``.
PRETRAINED_LEARNING_RATE = 3e-4


@attrs.frozen(kw_only=True)
class LoraConfig:
    """``model.lora`` section: the LoRA adapters of ``model.trainable: lora``.

    Attributes:
        r: Rank of each adapter.
        alpha: Scaling numerator (the update is scaled by ``alpha / r``).
        dropout: Dropout on the adapter's input while training.
        target_modules: Names of the language model's linear layers that get an
            adapter (attention ``q_proj,k_proj,v_proj,o_proj``; add
            ``gate_proj,up_proj,down_proj`` for the MLP). Only the language model
            is adapted, never the vision tower.
    """

    r: int = attrs.field(default=8, validator=positive)
    alpha: float = attrs.field(default=16.0, validator=positive)
    dropout: float = attrs.field(default=0.05, validator=fraction)
    target_modules: tuple[str, ...] = attrs.field(
        default=("q_proj", "k_proj", "v_proj", "o_proj"), converter=as_tuple
    )

    @target_modules.validator
    def _check_targets(self, attribute: attrs.Attribute, value: tuple[str, ...]) -> None:
        if not value:
            raise ConfigError("target_modules: name at least one linear layer, e.g. q_proj")


@attrs.frozen(kw_only=True)
class ModelConfig:
    """``model`` section.

    Attributes:
        base: ``tiny`` (built-in, random weights, offline), a Llava checkpoint
            folder / hub id (CLIP or SigLIP vision tower: llava-1.5,
            llava-interleave, LLaVA-OneVision), or an UMBRELLA checkpoint folder
            (a run's ``final/``: its weights, embedders and LoRA adapters
            included, start this run).
        language: A causal language model folder or hub id (any
            ``AutoModelForCausalLM`` checkpoint: Llama, Qwen, Gemma 3, Phi, ...)
            to compose a new LLaVA-style model from: the patch embedders, the
            vision body of ``vision`` and a new projector in front of it.
            Empty: use ``base``.
        vision: The vision body of a composed model: ``fresh`` (a small
            transformer built from a config, ``vision_layers`` layers of width
            ``vision_hidden_size``), ``none`` (the patch embedders feed the
            projector directly) or a pretrained CLIP / SigLIP model or vision
            tower folder (its transformer layers; its 2D patch embedding is
            replaced by the 3D/4D embedders).
        vision_hidden_size: Width of the embedders' tokens for ``fresh`` and ``none``.
        vision_layers: Transformer layers of a ``fresh`` vision body.
        trainable: ``embedders`` (the patch embedders, as in the original UMBRELLA),
            ``projector`` (embedders + projector), ``lora`` (LoRA adapters on the
            language model, see ``lora``, plus embedders + projector), ``full``,
            or ``auto``: ``full`` for the randomly initialised ``tiny`` model (it
            has nothing worth freezing), LLaVA's two stages for a model composed
            from a language model (``projector``, then ``lora``: see
            :func:`umbrella_core.train.recipes.default_stages`), ``embedders`` for a
            trained LLaVA or UMBRELLA checkpoint. A fresh vision body trains
            wherever the projector does.
        max_length: Longest conversation in tokens, image tokens included.
        lora: LoRA settings (used by ``trainable: lora``).
        chat_template: How conversations are written out for the language model
            (ARCHITECTURE I9): ``auto`` (the tokenizer's own chat template, else the
            built-in one whose turn tokens its vocabulary holds, else ``llava-1.5``),
            a built-in name (``llava-1.5``, ``chatml``,
            ``llama3``, ``gemma``) or a ``.jinja`` file. The chosen template is
            saved with the checkpoint's tokenizer, so ``auto`` finds it again.
        system_prompt: A system message put first in every conversation that has
            none; empty: none (the template may still add its own default).
    """

    base: str = "tiny"
    language: str = ""
    vision: str = "fresh"
    vision_hidden_size: int = attrs.field(default=256, validator=positive)
    vision_layers: int = attrs.field(default=2, validator=positive)
    trainable: str = attrs.field(
        default="auto", validator=one_of("auto", "embedders", "projector", "lora", "full")
    )
    max_length: int = attrs.field(default=1024, validator=positive)
    lora: LoraConfig = attrs.field(factory=LoraConfig)
    chat_template: str = "auto"
    system_prompt: str = ""


@attrs.frozen(kw_only=True)
class StudyConfig:
    """One study: where it is, its sampling weight, and options for its reader.

    In YAML a study is a location string (``bids:/data/ds000030``) or a mapping
    ``{location: ..., weight: 2.0, tasks: [sex, age]}``; keys other than
    ``location`` and ``weight`` are passed to the study reader as ``options``
    (or put them under an ``options:`` mapping; both forms merge).
    """

    location: str
    weight: float | None = None
    options: dict[str, Any] = attrs.field(factory=dict)

    @classmethod
    def from_value(cls, value: Any, key: str) -> StudyConfig:
        if isinstance(value, StudyConfig):
            return value
        if isinstance(value, str) and value:
            return cls(location=value)
        if not isinstance(value, Mapping) or not isinstance(value.get("location"), str):
            raise ConfigError(
                f"{key}: expected a location or a mapping with 'location', got {value!r}"
            )
        weight = value.get("weight")
        if weight is not None and (
            isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0
        ):
            raise ConfigError(f"{key}.weight: expected a positive number, got {weight!r}")
        options = {k: v for k, v in value.items() if k not in ("location", "weight", "options")}
        nested = value.get("options")
        if nested is not None:
            if not isinstance(nested, Mapping):
                raise ConfigError(f"{key}.options: expected a mapping, got {nested!r}")
            options = {**dict(nested), **options}
        return cls(
            location=value["location"],
            weight=None if weight is None else float(weight),
            options=options,
        )


@attrs.frozen(kw_only=True)
class SplitConfig:
    """``data.split`` section: how records are put on the train, validation and test sides.

    A study whose records give splits keeps them (records without one are
    ``train``); for a study that gives none a split is made. Either way no
    subject, and no family where the records name families, is on two sides
    (ARCHITECTURE I10), and the run writes what was decided to
    ``OUTPUT_DIR/split.tsv`` (see :mod:`umbrella_core.data.split`).

    Attributes:
        by: The unit kept on one side: ``subject``, ``family`` (a family's
            subjects together), ``site`` (an acquisition site's subjects
            together) or ``auto`` (family in studies whose records name
            families, else subject). Subjects named together in one record
            (comparisons) are always kept together.
        stratify: A phenotype whose values keep their proportions on every
            side (``sex``, ``diagnosis``); numeric ones (``age``) by quintile
            bins. None: no stratification.
        test: Fraction of each study's units made ``test`` (rounded half up).
        validation: Fraction made ``validation`` (rounded half up); every study
            keeps at least one ``train`` unit.
        seed: Seeds the split, apart from ``trainer.seed``: runs that differ
            in their training seed (to measure its spread) must be compared on
            the same held-out subjects, so the split stays put unless this
            changes.
        file: A ``split.tsv`` written by an earlier run: its sides are used,
            reproducing that run's split; a subject missing from it is an error.
        leak: ``error`` (default): a subject or family the studies give on two
            sides stops the run, naming both records; ``warn``: it is logged
            and the given splits are kept.
    """

    by: str = attrs.field(default="auto", validator=one_of("auto", "subject", "family", "site"))
    stratify: str | None = attrs.field(default=None, converter=lambda v: v or None)
    test: float = attrs.field(default=0.1, validator=fraction)
    validation: float = attrs.field(default=0.1, validator=fraction)
    seed: int = 0
    file: str = ""
    leak: str = attrs.field(default="error", validator=one_of("error", "warn"))

    def __attrs_post_init__(self) -> None:
        if self.test + self.validation >= 1.0:
            raise ConfigError(
                f"validation: test ({self.test}) + validation ({self.validation}) must be "
                "below 1, so that training keeps some subjects"
            )


@attrs.frozen(kw_only=True)
class DataConfig:
    """``data`` section.

    Attributes:
        modalities: Modalities to train (names or aliases); empty: every installed one.
        studies: Studies (see :class:`StudyConfig`); empty: the built-in demo. A study
            with a ``weight`` gets that share of the draws (relative to the other
            weighted studies), split among its modality groups by size.
        weights: Sampling weight per ``study/modality`` group; overrides study weights.
        temperature: Where weights follow group sizes, they follow
            ``size ** (1 / temperature)``: 1 is proportional to size (every
            sample once an epoch), larger values move towards equal shares.
        batching: ``mixed`` (any modalities in a batch), ``modality`` (each
            optimizer step, over all ranks, holds one modality: LLaVA's
            group-by-modality) or ``length`` (as ``modality``, and each step's
            samples of similar length, so batches pad less; since 0.3).
        geometry: Per-modality overrides, ``{t1: {shape: [..], patch_size: [..]}}``.
        preprocessing: Per-modality preprocessing settings, as each plugin
            defines them: ``{t1: {spacing: 1.0}, fmri: {target_tr: 0.8}}``.
        demo_subjects: Subjects per modality in the built-in demo (a tenth for
            validation, a fifth for test).
        workers: DataLoader worker processes (the records are packed for
            them, :mod:`umbrella_core.data.packed`); 2 or more: also the
            processes that check images the header index does not hold.
        check: Checks before step 1: ``files`` (files exist, conversations fit),
            ``full`` (also decode every image, as ``umbrella validate``) or ``none``.
        on_bad: ``stop`` (default: no training while any sample is bad) or ``skip``
            (train without them; they are listed in ``bad_samples.json``).
        cache: Keep preprocessed images in the on-disk cache (decode each file once).
        cache_dir: Where; default ``$UMBRELLA_CACHE/preprocessed``.
        cache_dtype: How cache entries are stored: ``float32``, or ``float16``
            (half the disk and read bandwidth; read back as float32, each value
            to a relative 2⁻¹¹; an image beyond float16's ±65504 keeps a float32
            entry). The two never share entries. Since 0.3.
        header_index: Folder of the header index, which keeps what checking
            each image found between launches, so a relaunch or ``--resume``
            opens only new or changed files
            (:mod:`umbrella_core.data.header_index`); default
            ``$UMBRELLA_CACHE/headers``; ``off``: check every file on every
            launch. Since 0.3.
        allow_outside_root: Accept image paths outside each study's root (its
            folder, or the folder holding its manifest): absolute paths
            elsewhere, ``../`` out of it, symlinks pointing out. Off: such a
            record is an error naming it.
        split: How records are split into train, validation and test
            (:class:`SplitConfig`): ``data.split.test=0.2`` on the command line.
        augment: Per modality, random augmentation of training images: a
            preset (``light``) or a list of transforms by name and arguments,
            ``{t1: [{name: RandAffine, prob: 0.5}]}``; see
            :mod:`umbrella_core.augmentation`. Off by default. Since 0.3.
        laterality: Per study, what a left-right mirror does to its answers:
            ``refuse``, ``swap`` or ``ignore``, for records that declare none. Since 0.3.
    """

    modalities: tuple[str, ...] = attrs.field(default=(), converter=as_tuple)
    studies: tuple[StudyConfig, ...] = attrs.field(default=(), converter=as_tuple)
    weights: dict[str, float] = attrs.field(factory=dict, validator=sampling_weights)
    temperature: float = attrs.field(default=1.0, validator=positive)
    batching: str = attrs.field(default="mixed", validator=one_of("mixed", "modality", "length"))
    geometry: dict[str, dict[str, list[int]]] = attrs.field(factory=dict)
    preprocessing: dict[str, dict[str, Any]] = attrs.field(factory=dict)
    demo_subjects: int = attrs.field(default=240, validator=positive)
    workers: int = attrs.field(default=0, validator=not_negative)
    check: str = attrs.field(default="files", validator=one_of("none", "files", "full"))
    on_bad: str = attrs.field(default="stop", validator=one_of("stop", "skip"))
    cache: bool = False
    cache_dir: str = ""
    cache_dtype: str = attrs.field(default="float32", validator=one_of("float32", "float16"))
    header_index: str = ""
    allow_outside_root: bool = False
    split: SplitConfig = attrs.field(factory=SplitConfig)
    augment: dict[str, Any] = attrs.field(factory=dict)
    laterality: dict[str, str] = attrs.field(factory=dict)


@attrs.frozen(kw_only=True)
class TrainerConfig:
    """``trainer`` section (what it does not set keeps the transformers default).

    Attributes:
        eval_strategy: When to evaluate on the ``validation`` records (the
            ``test`` ones where the studies have none): ``epoch``, ``steps``
            (every ``eval_steps``), ``end`` (only the table of the ``test``
            records after the last step) or ``no`` (none at all, not even
            that table: ``umbrella evaluate --checkpoint OUTPUT_DIR/final``
            gives it later).
        eval_max_samples: Held-out samples each evaluation during training
            scores, evenly spread over the held-out set; 0: all. The table
            at the end always scores every ``test`` sample.
        eval_max_new_tokens: Most tokens decoded for an answer that is
            generated (numbers, free text) rather than chosen among candidates;
            within it, twice the longest answer the question has in the run
            (at least 8 tokens more): an untrained model never stops by itself.
        early_stopping_patience: Evaluations without improvement of
            ``metric_for_best`` before training stops; 0: never.
        metric_for_best: The evaluation metric that picks the best checkpoint
            (``eval_loss``, lower is better, or ``eval_accuracy``).
        adam_beta2: AdamW's decay of its squared-gradient average. 0.95 (as in
            GPT-3 and Llama training), not torch's 0.999: once the training
            loss is near zero, a 0.999 average remembers the tiny gradients of
            hundreds of steps, so one larger gradient is divided by a far too
            small root and moves the weights by up to ~30 learning rates over
            the next steps; 0.95 bounds that at ~6.
        load_best_at_end: At the end, load the best evaluated weights (``best/``)
            so that ``final/`` and the printed table are of them, as transformers'
            ``load_best_model_at_end``. Only where the studies have a
            ``validation`` split: choosing on the ``test`` records that the table
            reports would flatter it, so without one ``final/`` keeps the last
            weights (and the run says so). Off: always the last weights.
        generate_samples: Held-out samples whose generated answers are logged
            to TensorBoard at each evaluation, with mid-slices of their images.
        bf16: bfloat16 mixed precision (where the hardware supports it).
        gradient_checkpointing: Recompute activations in the backward pass.
        deepspeed: ``zero2``, ``zero3`` (the shipped configs) or a DeepSpeed
            JSON file; empty: no DeepSpeed.
        save_total_limit: Training checkpoints (``checkpoint-N``) kept; older
            ones are deleted (the best one is kept too). 0: keep all.
        resume: ``auto`` (the latest checkpoint in ``output_dir``) or a
            checkpoint folder to continue from; empty: start fresh.
        overwrite: Remove the outputs of an earlier run in ``output_dir``
            (checkpoints, ``final/``, ``best/``, metrics, TensorBoard events)
            before starting; off, a folder holding them is refused (see
            :mod:`umbrella_core.train.run_folder`).
        learning_rate: AdamW's peak learning rate (cosine schedule); null (the
            default): :func:`learning_rate` chooses by what the run starts
            from. (Since 0.5.)
        resume_allow: Settings (dotted names, ``trainer.learning_rate``) that
            may differ from the checkpoint's on ``resume``; the others are
            refused, naming each change.
        report_to: Experiment trackers that get the losses, the evaluation
            metrics and the run configuration: ``tensorboard``
            (``OUTPUT_DIR/tensorboard``), ``mlflow`` (``OUTPUT_DIR/mlruns``
            unless ``MLFLOW_TRACKING_URI`` is set), ``wandb`` (offline into
            ``OUTPUT_DIR/wandb`` unless W&B is set up for online); a list or a
            comma string, ``none`` for none (see
            :mod:`umbrella_core.train.trackers`). (Since 0.3.)
        experiment: The MLflow experiment and W&B project of the run; empty:
            ``MLFLOW_EXPERIMENT_NAME`` / ``WANDB_PROJECT``, else the output
            folder's name (the run itself is always named after the output
            folder). (Since 0.3.)
    """

    output_dir: str = attrs.field(default="runs/umbrella", validator=not_blank)
    # The demo's validation accuracy levels off by step ~100; more steps only
    # go on fitting its 336 training images (see benchmarks/demo_seeds.py).
    max_steps: int = attrs.field(default=200, validator=not_negative)
    epochs: float = attrs.field(default=1.0, validator=positive)
    batch_size: int = attrs.field(default=16, validator=positive)
    learning_rate: float | None = attrs.field(
        default=None, validator=attrs.validators.optional(positive)
    )
    warmup_ratio: float = attrs.field(default=0.05, validator=unit_interval)
    weight_decay: float = attrs.field(default=0.0, validator=not_negative)
    adam_beta2: float = attrs.field(default=0.95, validator=fraction)
    seed: int = attrs.field(default=0, validator=seed)
    logging_steps: int = attrs.field(default=10, validator=positive)
    save_steps: int = attrs.field(default=0, validator=not_negative)
    save_total_limit: int = attrs.field(default=0, validator=not_negative)
    progress: bool = True
    eval_strategy: str = attrs.field(
        default="epoch", validator=one_of("epoch", "steps", "end", "no")
    )
    eval_steps: int = attrs.field(default=0, validator=not_negative)
    eval_max_samples: int = attrs.field(default=0, validator=not_negative)
    eval_max_new_tokens: int = attrs.field(default=128, validator=positive)
    early_stopping_patience: int = attrs.field(default=0, validator=not_negative)
    metric_for_best: str = attrs.field(
        default="eval_loss", validator=one_of("eval_loss", "eval_accuracy")
    )
    load_best_at_end: bool = True
    generate_samples: int = attrs.field(default=4, validator=not_negative)
    bf16: bool = False
    gradient_checkpointing: bool = False
    deepspeed: str = ""
    resume: str = ""
    overwrite: bool = False
    resume_allow: tuple[str, ...] = attrs.field(default=(), converter=as_tuple)
    report_to: tuple[str, ...] = attrs.field(
        default=("tensorboard",), converter=tracker_names, validator=known_trackers
    )
    experiment: str = ""


@attrs.frozen(kw_only=True)
class RunConfig:
    model: ModelConfig = attrs.field(factory=ModelConfig)
    data: DataConfig = attrs.field(factory=DataConfig)
    trainer: TrainerConfig = attrs.field(factory=TrainerConfig)
    loss: dict[str, Any] = attrs.field(factory=dict)
    # Settings of the metric families' plugins (the umbrella_metrics hook), and
    # baselines: auto | on | off (umbrella_core.evaluation.baselines).
    evaluation: dict[str, Any] = attrs.field(
        factory=dict, converter=evaluation_settings, validator=known_baselines
    )
    # Training stages run one after the other, each from the previous one's
    # checkpoint: overrides of this config per stage (umbrella_core.train.recipes).
    stages: tuple[dict[str, Any], ...] = attrs.field(default=(), converter=as_tuple)

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


def learning_rate(config: RunConfig) -> tuple[float, str]:
    """The run's learning rate, and where it comes from.

    ``trainer.learning_rate`` where it is set; otherwise
    :data:`RANDOM_START_LEARNING_RATE` for the built-in ``tiny`` model and
    :data:`PRETRAINED_LEARNING_RATE` for any start that holds a pretrained
    language model.
    """
    given = config.trainer.learning_rate
    if given is not None:
        return given, "trainer.learning_rate"
    return chosen_learning_rate(config.model.language, config.model.base)


def chosen_learning_rate(language: str, base: str) -> tuple[float, str]:
    """The learning rate left to choose, for a run with ``model.language`` and ``model.base``."""
    if not language and base == "tiny":
        return RANDOM_START_LEARNING_RATE, "auto: random weights"
    return PRETRAINED_LEARNING_RATE, "auto: a pretrained language model"
