"""A run's data, assembled before its model: screened records, augmentation, datasets.

The first phase of ``umbrella train`` (:func:`assemble_data`), from the studies as
:func:`~umbrella_core.data.studies.read_studies` read and split them: every record
screened with the run's :class:`Tokenization` alone (a bad record costs seconds, not
a model load), ``data.on_bad`` applied, the augmentation planned and checked against
the training records, one training set per study and modality key with its
sampling weight, and the held-out sets. Nothing here needs the model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

from umbrella_core.augmentation import Pipeline, run_pipelines
from umbrella_core.config import RunConfig
from umbrella_core.data.conversation import Tokenization
from umbrella_core.data.dataset import RecordDataset, group_records
from umbrella_core.data.studies import StudyData, screen_records
from umbrella_core.errors import ConfigError, DataError
from umbrella_core.plugins import PluginManager
from umbrella_core.types import StudyRecord

__all__ = ["RunData", "assemble_data", "held_out_sets"]

#: ``make(records, name, key)``: a dataset of the run (its specs, tokenization, cache).
MakeDataset = Callable[..., RecordDataset]


@attrs.define
class RunData:
    """What a run trains and evaluates on, before its model is built."""

    studies: StudyData
    tokenization: Tokenization
    train_sets: list[RecordDataset]
    #: The sampling weight of each training set (``data.weights``, study weights, sizes).
    weights: list[float]
    #: Evaluated during training, picks best/: the validation records (test
    #: records where the studies have no validation split).
    eval_set: RecordDataset | None
    #: Reported by the table at the end: the test records (the validation
    #: records where there are none; then ``test_set is eval_set``).
    test_set: RecordDataset | None
    #: Records screened out (``data.on_bad: skip``), as ``validate.Problem`` values.
    problems: list[Any]
    #: Modality -> its augmentation of training images.
    augment: dict[str, Pipeline]


def assemble_data(
    config: RunConfig, pm: PluginManager, data: StudyData, *, log: Callable[[str], None] = print
) -> RunData:
    """Screen ``data``'s records, plan the augmentation, and build the run's datasets.

    Raises:
        DataError: problems in the data under ``data.on_bad: stop``, or no
            training record.
        ConfigError: an augmentation that would change an answer, or a
            ``data.weights`` group that does not exist.
    """
    tokenization = Tokenization.for_run(config.model, data.specs)
    data, problems, lengths = _screen(config, pm, data, tokenization, log)
    # Before the model: a refused augmentation costs seconds, not a model load.
    augment = run_pipelines(config, pm, data.specs, data.records, log, encode=tokenization.encode)
    make = _dataset_maker(config, data, tokenization, lengths)
    train_sets, weights = _training_sets(config, data, make)
    eval_set, test_set = held_out_sets(data.records, make)
    return RunData(
        studies=data,
        tokenization=tokenization,
        train_sets=train_sets,
        weights=weights,
        eval_set=eval_set,
        test_set=test_set,
        problems=problems,
        augment=augment,
    )


def _screen(
    config: RunConfig,
    pm: PluginManager,
    data: StudyData,
    tokenization: Tokenization,
    log: Callable[[str], None],
) -> tuple[StudyData, list[Any], dict[tuple[Any, ...], int]]:
    """The usable records, the problems (read and screened), and each conversation's length."""
    lengths: dict[tuple[Any, ...], int] = {}
    per_study, problems = screen_records(
        data.per_study,
        check=config.data.check,
        encode=tokenization.encode,
        pm=pm,
        specs=data.specs,
        index=data.header_index,
        workers=config.data.workers,
        progress=config.trainer.progress,
        log=log,
        lengths=lengths,
    )
    if data.header_index is not None:
        data.header_index.save()
    problems = data.problems + problems  # refused while reading, then screened
    if problems and config.data.on_bad == "stop":
        shown = "\n  ".join(str(p) for p in problems[:5])
        more = f"\n  ... and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise DataError(
            f"{len(problems)} problem(s) in the data; nothing was trained "
            f"(set data.on_bad=skip to train without the bad samples):\n  {shown}{more}"
        )
    if problems:
        log(f"skipping {len(problems)} bad sample(s) (data.on_bad=skip); first: {problems[0]}")
    return attrs.evolve(data, per_study=per_study), problems, lengths


def _dataset_maker(
    config: RunConfig,
    data: StudyData,
    tokenization: Tokenization,
    lengths: dict[tuple[Any, ...], int],
) -> MakeDataset:
    """How the run makes a dataset of some of its records."""
    cache = None
    if config.data.cache:
        from umbrella_core.data.cache import PreprocessedCache, default_cache_root

        cache = PreprocessedCache(
            config.data.cache_dir or default_cache_root(),
            data.versions(),
            dtype=config.data.cache_dtype,
        )
    frames = data.header_index.frames if data.header_index is not None else None

    def make(records: list[StudyRecord], name: str, key: str | None = None) -> RecordDataset:
        return RecordDataset(
            records,
            data.specs,
            tokenization,
            name=name,
            key=key,
            cache=cache,
            frames=frames,
            # Screening encoded every conversation: no second pass for length batching.
            record_lengths=[lengths[(r.turns, r.modalities)] for r in records],
        )

    return make


def _training_sets(
    config: RunConfig, data: StudyData, make: MakeDataset
) -> tuple[list[RecordDataset], list[float]]:
    """One training set per study and modality key, and the share of samples each gets.

    A study's weight (``data.studies[].weight``; unweighted studies get the mean of
    the weighted ones) is spread over its sets by size at ``data.temperature``;
    ``data.weights`` overrides a set's weight by its name (``study/key``).
    """
    from umbrella_core.data.interleave import size_weights

    train_sets: list[RecordDataset] = []
    weights: list[float] = []
    weighted = [s.weight for s in data.studies if s.weight is not None]
    default_weight = (sum(weighted) / len(weighted)) if weighted else None
    for study, study_records in zip(data.studies, data.per_study, strict=True):
        groups = group_records([r for r in study_records if r.split == "train"])
        sets = [make(group, f"{name}/{key}", key) for (name, key), group in groups.items()]
        # Sizes in samples, not records: a long fMRI series is several windows.
        sizes = size_weights([len(ds) for ds in sets], config.data.temperature)
        share = study.weight if study.weight is not None else default_weight
        for ds, size in zip(sets, sizes, strict=True):
            weight = size if share is None else share * size / sum(sizes)
            train_sets.append(ds)
            weights.append(float(config.data.weights.get(ds.name, weight)))
    if not train_sets:
        raise DataError(f"no training record (split: train) in {', '.join(data.locations)}")
    if not any(weights):
        raise ConfigError(
            "data.weights: every group of training records has weight 0, so nothing would "
            f"be drawn; give one of {', '.join(ds.name for ds in train_sets)} a positive weight"
        )
    unknown = sorted(set(config.data.weights) - {ds.name for ds in train_sets})
    if unknown:
        raise ConfigError(
            f"data.weights.{unknown[0]}: no such group of training records; the groups are "
            f"{', '.join(ds.name for ds in train_sets)} (study/modalities)"
        )
    return train_sets, weights


def held_out_sets(
    records: list[StudyRecord], make: MakeDataset
) -> tuple[RecordDataset | None, RecordDataset | None]:
    """``(eval_set, test_set)``: what evaluation during training sees, what the end reports.

    Evaluation during training (and so the choice of ``best/``) uses the
    ``validation`` records and the table at the end the ``test`` ones, so that
    the reported figures are not of the records that chose the weights. Studies
    with only one held-out split use it for both (records of any split but
    ``train`` and ``validation`` count as test), as before there was a choice.
    """
    validation = [r for r in records if r.split == "validation"]
    test = [r for r in records if r.split not in ("train", "validation")]
    if validation and test:
        return make(validation, "validation"), make(test, "test")
    held_out = validation or test
    if not held_out:
        return None, None
    both = make(held_out, "held-out")
    return both, both
