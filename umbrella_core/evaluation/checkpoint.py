"""``umbrella evaluate``: a saved checkpoint's answers on a split of its studies, scored.

The checkpoint is loaded for inference (:mod:`umbrella_core.inference.generate`),
its studies read as the run read them (its split file, geometry, preprocessing,
cache), each held-out question scored by its metric family
(:mod:`umbrella_core.evaluation.engine`), and the simple baseline fitted beside each
figure (:mod:`umbrella_core.evaluation.baselines`). The report is
:mod:`umbrella_core.evaluation.report`'s.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from umbrella_core.evaluation.engine import Evaluation, Question, evaluate_dataset, index_questions

__all__ = ["evaluate_checkpoint"]


def evaluate_checkpoint(
    checkpoint: str,
    pm: Any,
    *,
    studies: Sequence[str] = (),
    split: str = "test",
    batch_size: int | None = None,
    max_samples: int = 0,
    progress: bool = False,
    log: Callable[[str], None] = print,
) -> Evaluation:
    """``umbrella evaluate``: a checkpoint's answers on a split of its studies, scored.

    Studies are the checkpoint's own (from the run configuration it stores;
    the built-in demo is written again exactly as training wrote it) unless
    ``studies`` names others. ``split`` is ``test``, ``validation``, ``train``
    or ``held-out`` (everything but ``train``). The simple baseline beside each
    figure (``evaluation.baselines``) is fitted on the studies' ``train``
    records and chosen on their ``validation`` records, read as the run read
    them (geometry, preprocessing, cache), unless they are the split evaluated.
    """
    from umbrella_core.data.collate import UmbrellaCollator
    from umbrella_core.data.studies import read_studies
    from umbrella_core.inference.generate import load_for_inference

    loaded = load_for_inference(checkpoint, pm)
    config = _studies_of(checkpoint, loaded.config, studies, log)
    data = read_studies(config, pm, log=log)
    dataset = _split_set(checkpoint, loaded, data, split)
    if config.data.workers:
        dataset.pack()  # forked workers then copy none of the records' pages
    questions = index_questions(data.records, pm.metric_families(config.evaluation))
    evaluation = evaluate_dataset(
        loaded.model,
        dataset,
        UmbrellaCollator(loaded.tokenizer.pad_token_id, tuple(loaded.model.specs)),
        questions,
        batch_size=batch_size or config.trainer.batch_size,
        workers=config.data.workers,
        max_samples=max_samples,
        max_new_tokens=config.trainer.eval_max_new_tokens,
        progress=progress,
        description=f"evaluating {split}",
    )
    _checkpoint_baselines(
        evaluation, dataset, split, questions, loaded, config, data, pm, max_samples, log
    )
    return evaluation


def _studies_of(
    checkpoint: str, config: Any, studies: Sequence[str], log: Callable[[str], None]
) -> Any:
    """The run configuration with the studies to evaluate: ``studies``, else the run's own,
    split as the run split them (its ``split.tsv``: the same test subjects)."""
    import attrs

    from umbrella_core.config import StudyConfig
    from umbrella_core.data.split_table import split_file_of_checkpoint

    if studies:
        given = tuple(StudyConfig(location=s) for s in studies)
        return attrs.evolve(config, data=attrs.evolve(config.data, studies=given))
    written = split_file_of_checkpoint(checkpoint)
    if written is None or config.data.split.file:
        return config
    log(f"split of the run: {written}")
    sides = attrs.evolve(config.data.split, file=str(written))
    return attrs.evolve(config, data=attrs.evolve(config.data, split=sides))


def _split_set(checkpoint: str, loaded: Any, data: Any, split: str) -> Any:
    """The records of ``split`` as a dataset read as the checkpoint's run read its images.

    Raises:
        ModelError: the studies' geometry is not the checkpoint's.
        DataError: no record of ``split``.
    """
    from umbrella_core.data.dataset import RecordDataset
    from umbrella_core.errors import DataError, ModelError

    for name, spec in data.specs.items():
        have = loaded.specs.get(name)
        if have is None or have.input_shape != spec.input_shape:
            raise ModelError(
                f"{checkpoint}: the checkpoint's {name} input is "
                f"{have.input_shape if have else 'absent'}, its run configuration gives "
                f"{spec.input_shape}"
            )
    wanted = [
        r for r in data.records if (r.split != "train" if split == "held-out" else r.split == split)
    ]
    if not wanted:
        present = sorted({str(r.split) for r in data.records})
        raise DataError(
            f"no record of split {split!r} in {', '.join(data.locations)} "
            f"(splits there: {', '.join(present)})"
        )
    return RecordDataset(
        wanted,
        loaded.specs,
        loaded.tokenization(),
        name=split,
        frames=data.header_index.frames if data.header_index is not None else None,
    )


def _checkpoint_baselines(
    evaluation: Evaluation,
    dataset: Any,
    split: str,
    questions: dict[str, Question],
    loaded: Any,
    config: Any,
    data: Any,
    pm: Any,
    max_samples: int,
    log: Callable[[str], None],
) -> None:
    """``umbrella evaluate``'s baselines: fitted on the run's training records, chosen on its
    validation records (neither when it is the split evaluated), read as the run read them."""
    from umbrella_core.data.dataset import RecordDataset
    from umbrella_core.evaluation.baselines import add_baselines, baseline_mode

    mode = baseline_mode(config.evaluation)
    if mode == "off":
        return
    cache = None
    if config.data.cache:
        from umbrella_core.data.cache import PreprocessedCache, default_cache_root

        root = config.data.cache_dir or default_cache_root()
        cache = PreprocessedCache(root, data.versions(), dtype=config.data.cache_dtype)

    def side(name: str) -> Any:
        records = [r for r in data.records if r.split == name]
        if not records:
            return None
        return RecordDataset(
            records,
            loaded.specs,
            loaded.tokenization(),
            name=name,
            cache=cache,
            frames=data.header_index.frames if data.header_index is not None else None,
        )

    train = side("train") if split != "train" else None
    add_baselines(
        evaluation,
        test_set=dataset,
        train_sets=[train] if train is not None else [],
        validation_set=side("validation") if split not in ("validation", "held-out") else None,
        questions=questions,
        baselines=pm.baselines(),
        mode=mode,
        max_samples=max_samples,
        workers=config.data.workers,
        log=log,
    )
