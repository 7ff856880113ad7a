"""``umbrella train``: from a configuration to a trained, evaluated checkpoint."""

from __future__ import annotations

import errno
import json
import os
import pickle
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from umbrella_core.augmentation import run_pipelines
from umbrella_core.config import RunConfig
from umbrella_core.data.dataset import RecordDataset, group_records
from umbrella_core.data.packed import ready_for_workers
from umbrella_core.data.studies import (
    StudyData,
    check_headers_once,
    read_studies,
    screen_records,
)
from umbrella_core.errors import ConfigError, DataError, OutputError
from umbrella_core.plugins import PluginManager
from umbrella_core.train import arguments
from umbrella_core.train.prepared import Prepared, held_out_sets, summary
from umbrella_core.types import ModalitySpec, StudyRecord

__all__ = ["prepare", "train"]


def record_encoder(
    config: RunConfig, specs: dict[str, ModalitySpec]
) -> Callable[[StudyRecord], Any]:
    """How the run tokenises a record, from its tokenizer alone (no model is built).

    Screening (``train``, ``validate``) encodes each record with it, so a
    conversation too long for the run is found before step 1.
    """
    from umbrella_core.model.chat import chat_format
    from umbrella_core.model.start import load_tokenizer

    tokenizer, image_token_id = load_tokenizer(config.model)
    return RecordDataset(
        [],
        specs,
        tokenizer=tokenizer,
        image_token_id=image_token_id,
        max_length=config.model.max_length,
        chat=chat_format(tokenizer, config.model.chat_template, config.model.system_prompt),
    ).encode


def prepare(
    config: RunConfig,
    pm: PluginManager,
    *,
    log: Callable[[str], None] = print,
    data: StudyData | None = None,
) -> Prepared:
    """Resolve plugins, read and screen studies (unless ``data`` holds them), build the model.

    Nothing is trained yet. Records are screened (:func:`screen_records`) with
    the run's tokenizer alone, before the model is built: a bad record costs
    seconds, not a model load. In a distributed run every rank calls this:
    under ZeRO-3 building the model is a collective (parameters are
    partitioned as they are created), so only :func:`read_studies` may run on
    one rank first.
    """
    from umbrella_core.data.interleave import size_weights
    from umbrella_core.model.chat import chat_format
    from umbrella_core.model.start import start_model

    if data is None:
        data = read_studies(config, pm, log=log)
    specs, provenance, studies = data.specs, data.provenance, data.studies
    per_study, skipped, locations = data.per_study, data.skipped, data.locations

    lengths: dict[tuple[Any, ...], int] = {}
    encode = record_encoder(config, specs)
    per_study, problems = screen_records(
        per_study,
        check=config.data.check,
        encode=encode,
        pm=pm,
        specs=specs,
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
    data = attrs.evolve(data, per_study=per_study)
    # Before the model: a refused augmentation costs seconds, not a model load.
    augment = run_pipelines(
        config, pm, specs, (r for rs in per_study for r in rs), log, encode=encode
    )

    terms = pm.loss_terms(tuple(specs), dict(config.loss))
    started = start_model(config.model, specs, pm, loss_terms=terms, seed=config.trainer.seed)
    model, tokenizer = started.model, started.tokenizer
    is_random, trainable = started.base_is_random, started.trainable
    # The builder readied the tokenizer for model.chat_template (prepare_tokenizer).
    chat = chat_format(tokenizer, config.model.chat_template, config.model.system_prompt)

    cache = None
    if config.data.cache:
        from umbrella_core.data.cache import PreprocessedCache, default_cache_root

        cache = PreprocessedCache(
            config.data.cache_dir or default_cache_root(),
            data.versions(),
            dtype=config.data.cache_dtype,
        )

    def dataset(group: list[StudyRecord], name: str) -> RecordDataset:
        return RecordDataset(
            group,
            specs,
            tokenizer=tokenizer,
            image_token_id=model.image_token_id,
            max_length=config.model.max_length,
            name=name,
            cache=cache,
            chat=chat,
            frames=data.header_index.frames if data.header_index is not None else None,
            # Screening encoded every conversation: no second pass for length batching.
            record_lengths=[lengths[(r.turns, r.modalities)] for r in group],
        )

    train_sets: list[RecordDataset] = []
    weights: list[float] = []
    weighted = [s.weight for s in studies if s.weight is not None]
    default_weight = (sum(weighted) / len(weighted)) if weighted else None
    for study, study_records in zip(studies, per_study, strict=True):
        groups = group_records([r for r in study_records if r.split == "train"])
        # Sizes in samples, not records: a long fMRI series is several windows.
        sets = {name: dataset(group, name) for name, group in groups.items()}
        sizes = size_weights([len(ds) for ds in sets.values()], config.data.temperature)
        total = sum(sizes)
        share = study.weight if study.weight is not None else default_weight
        for (name, ds), size in zip(sets.items(), sizes, strict=True):
            weight = size if share is None else share * size / total
            train_sets.append(ds)
            weights.append(float(config.data.weights.get(name, weight)))
    if not train_sets:
        raise DataError(f"no training record (split: train) in {', '.join(locations)}")
    unknown = sorted(set(config.data.weights) - {ds.name for ds in train_sets})
    if unknown:
        raise ConfigError(
            f"data.weights.{unknown[0]}: no such group of training records; the groups are "
            f"{', '.join(ds.name for ds in train_sets)} (study/modalities)"
        )
    eval_set, test_set = held_out_sets(data.records, dataset)
    return Prepared(
        config=config,
        specs=specs,
        provenance=provenance,
        model=model,
        tokenizer=tokenizer,
        train_sets=train_sets,
        eval_set=eval_set,
        test_set=test_set,
        studies=locations,
        weights=weights,
        skipped=skipped,
        problems=problems,
        trainable=trainable,
        base_is_random=is_random,
        trainable_reason=started.reason,
        start_kind=started.kind,
        augment=augment,
    )


def _import_model_stack() -> None:
    """Import what building the model and the Trainer imports, before the records are read.

    Imported later, the modules' objects sit among the records' in the
    allocator's pages, which then stay in use after the records are packed:
    each forked DataLoader worker's resident memory grew with the cohort
    (+130 MB from 10,000 to 100,000 records; +8 MB imported first).
    """
    import peft  # noqa: F401
    import transformers

    from umbrella_core.model import start  # noqa: F401

    transformers.LlavaForConditionalGeneration  # noqa: B018 (a lazy module's import)


def _sample_lengths(train_sets: list[RecordDataset], log: Callable[[str], None]) -> Any:
    """Each training sample's length in tokens, sources concatenated (``data.batching: length``)."""
    import numpy as np

    started = time.perf_counter()
    lengths = np.concatenate([ds.lengths for ds in train_sets])
    log(
        f"length batching: {len(lengths)} samples, {int(np.median(lengths))} tokens (median), "
        f"{int(lengths.max())} the longest; counted in {time.perf_counter() - started:.1f} s"
    )
    return lengths


def add_test_baselines(
    evaluation: Any,
    prep: Prepared,
    test_set: RecordDataset,
    questions: dict[str, Any],
    pm: PluginManager,
    log: Callable[[str], None],
) -> None:
    """The simple baseline beside each figure of the test table (``evaluation.baselines``).

    Fitted on the training sets, chosen on the validation set (none where the
    held-out records are one set, as the table's), on the main process only:
    the other ranks have no table to print. A baseline that fails (a plugin's
    bad features) is said in one line and leaves the VLM's table as it is:
    the run's weights and figures are worth more than the comparison.
    """
    from umbrella_core.errors import UmbrellaError
    from umbrella_core.evaluation.baselines import add_baselines, baseline_mode

    mode = baseline_mode(prep.config.evaluation)
    if mode == "off":
        return
    try:
        add_baselines(
            evaluation,
            test_set=test_set,
            train_sets=prep.train_sets,
            validation_set=prep.eval_set if prep.eval_set is not test_set else None,
            questions=questions,
            baselines=pm.baselines(),
            mode=mode,
            workers=prep.config.data.workers,
            log=log,
        )
    except UmbrellaError as exc:
        log(f"no baselines: {exc}")


def _quiet(*_: Any) -> None:
    """``log`` of the processes other than the main one."""


def describe_weights(final: dict[str, Any]) -> str:
    """Which weights ``final/`` holds, for the line above the table at the end of a run."""
    if final["weights"] == "best":
        return (
            f"best evaluated weights, step {final['step']}, {final['metric']} "
            f"{final['value']:.4f} on {final['split']}"
        )
    return f"last weights, step {final['step']}"


def train(
    config: RunConfig, pm: PluginManager, *, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Run training end to end; returns the final metrics (also written to ``metrics.json``).

    With ``stages``, runs each stage in turn (see :mod:`umbrella_core.train.recipes`).
    """
    if config.stages:
        # The caller chooses (umbrella train does): recipes run this once per stage.
        raise ConfigError(
            "stages: a staged run is umbrella_core.train.recipes.run_stages, not train()"
        )
    import torch
    from transformers.utils import logging as hf_logging

    from umbrella_core.train.run_folder import claim_run_folder, write_failure

    hf_logging.set_verbosity_error()
    if not config.trainer.progress:
        hf_logging.disable_progress_bar()  # "Loading weights" of a composed model, too
    torch.manual_seed(config.trainer.seed)
    out_dir = Path(config.trainer.output_dir).expanduser().resolve()
    # Creating the arguments starts the process group under torchrun /
    # accelerate launch / deepspeed; from here on only the main process
    # prints and writes, and it writes the demo data before the others read it.
    args = arguments.training_arguments(config, out_dir)
    if args.process_index != 0:
        log = _quiet
    resume = arguments.resume_checkpoint(config.trainer.resume, out_dir)
    # One run at a time in out_dir, never mixed with another's outputs.
    with claim_run_folder(
        config, out_dir, resume, main=args.process_index == 0, log=log
    ) as clear_earlier_run:
        try:
            return _train(config, pm, args, out_dir, resume, clear_earlier_run, log)
        except Exception as exc:
            code = write_failure(exc)
            if code is None:
                raise
            raise _no_room(out_dir, code) from exc


def _no_room(out_dir: Path, code: int) -> OutputError:
    """The line for a run whose outputs no longer fit: what is kept, how to go on."""
    from umbrella_core.train.faults import last_complete_checkpoint, remove_partials

    remove_partials(out_dir)  # half-written checkpoints: room back, never resumed from
    kept = last_complete_checkpoint(out_dir)
    last = f"the last complete checkpoint is {kept}" if kept else "no checkpoint was completed"
    fix = {
        errno.EFBIG: "raise the file-size limit (ulimit -f)",
        errno.EROFS: "make the file system writable",
    }.get(code, "free space (or raise the quota)")
    go_on = "umbrella train --resume with the same settings" if kept else "train again"
    return OutputError(
        f"{out_dir}: a write failed ({os.strerror(code)}); {last}; {fix}, then {go_on}"
    )


def _train(
    config: RunConfig,
    pm: PluginManager,
    args: Any,
    out_dir: Path,
    resume: str | None,
    clear_earlier_run: Callable[[], None],
    log: Callable[[str], None],
) -> dict[str, Any]:
    """:func:`train` once it holds its output folder."""
    from torch.utils.data import ConcatDataset
    from torch.utils.tensorboard import SummaryWriter

    from umbrella_core.data.augmented import AugmentedDataset, log_augmented_slices
    from umbrella_core.data.collate import UmbrellaCollator
    from umbrella_core.data.interleave import Interleaving
    from umbrella_core.evaluation.engine import evaluate_dataset, index_questions
    from umbrella_core.evaluation.report import format_table, summarize
    from umbrella_core.train.callbacks import (
        attach_evaluation,
        check_evaluation,
        load_best_weights,
    )
    from umbrella_core.train.evaluate import log_figures
    from umbrella_core.train.faults import interrupted_error, stop_on_signals
    from umbrella_core.train.trackers import describe_trackers, finish_trackers, tracker_callbacks
    from umbrella_core.train.trainer import UmbrellaTrainer

    t = config.trainer
    main_process = args.process_index == 0
    _import_model_stack()
    with args.main_process_first(desc="reading studies", local=False):
        data = read_studies(config, pm, log=log)
        check_headers_once(data, config, log=log)
    prep = prepare(config, pm, log=log, data=data)
    log(summary(prep))
    if resume is not None:
        log(f"resuming from {resume}")
    # Screened and built: only now may --overwrite remove the earlier run.
    clear_earlier_run()
    out_dir.mkdir(parents=True, exist_ok=True)
    if data.split is not None and main_process:
        from umbrella_core.data.split_table import SPLIT_FILE

        # Subject -> side, given back with data.split.file to reproduce it (I10).
        data.split.write(out_dir / SPLIT_FILE)
    if prep.problems and main_process:
        (out_dir / "bad_samples.json").write_text(
            json.dumps([p.to_json() for p in prep.problems], indent=2) + "\n"
        )
    interleaving = Interleaving(
        [len(ds) for ds in prep.train_sets],
        prep.weights,
        keys=[ds.name.rsplit("/", 1)[-1] for ds in prep.train_sets],
        # Counted here, before ready_for_workers packs the records (counting
        # packed ones would decode each).
        lengths=_sample_lengths(prep.train_sets, log) if config.data.batching == "length" else None,
    )
    collator = UmbrellaCollator(prep.tokenizer.pad_token_id, tuple(prep.specs))
    logging_dir = out_dir / "tensorboard"
    run_meta = {
        "config": config.to_dict(),
        "studies": prep.studies,
        "trainable": prep.trainable,
        "base_model": config.model.base,
    }
    # Each question's metric family, from every record of the run (a small
    # held-out set alone could make a closed question look open).
    families = pm.metric_families(config.evaluation)
    datasets = {id(ds): ds for ds in (*prep.train_sets, prep.eval_set, prep.test_set) if ds}
    questions = index_questions([r for ds in datasets.values() for r in ds.records], families)
    evaluating = check_evaluation(args, prep, questions, log)
    train_dataset = ConcatDataset(prep.train_sets)
    if prep.augment:  # the training samples only: held-out ones are read as they are
        train_dataset = AugmentedDataset(
            prep.train_sets, prep.augment, seed=t.seed, laterality=config.data.laterality
        )
        if main_process and "tensorboard" in t.report_to:
            with SummaryWriter(str(logging_dir)) as writer:
                log_augmented_slices(writer, train_dataset)
    trainer = UmbrellaTrainer(
        model=prep.model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=prep.eval_set if evaluating else None,
        data_collator=collator,
        processing_class=prep.tokenizer,
        interleaving=interleaving,
        batching=config.data.batching,
        provenance=prep.provenance,
        run_meta=run_meta,
        # trainer.report_to, from the main process only (one event file, one run).
        callbacks=tracker_callbacks(t.report_to, out_dir, config) if main_process else [],
    )
    trainer.questions = questions
    trainer.eval_max_samples = t.eval_max_samples
    trainer.eval_max_new_tokens = t.eval_max_new_tokens
    best = attach_evaluation(trainer, config, prep, out_dir) if evaluating else None
    if config.data.workers:
        del data  # the records' objects: the datasets keep them packed
        ready_for_workers(datasets.values())
    started = time.perf_counter()
    with stop_on_signals(trainer, log=log if main_process else _quiet) as stopper:
        try:
            result = trainer.train(resume_from_checkpoint=resume)
        except pickle.UnpicklingError as exc:
            # torch's message advises loading with weights_only=False: never do that.
            found = [line for line in str(exc).splitlines() if "GLOBAL" in line]
            raise DataError(
                f"{resume}: refused to load the checkpoint's training state: a file in it "
                "holds objects other than tensors and numbers, which could run code when "
                f"loaded ({(found or ['not a tensor file'])[0].strip()[:160]}); resume only "
                "from checkpoints an UMBRELLA run wrote, or start afresh without --resume"
            ) from None
    if stopper.stopped_at is not None:
        # SIGINT/SIGTERM: checkpoint-N is saved; no final/ and no metrics.json.
        raise interrupted_error(stopper, out_dir)
    elapsed = time.perf_counter() - started
    final_dir = out_dir / "final"
    metrics: dict[str, Any] = {
        "train_loss": result.training_loss,
        "steps": result.global_step,
        "train_seconds": round(elapsed, 1),
    }
    # What final/ (and the table below) holds: the last weights, or the best evaluated ones.
    final_weights: dict[str, Any] = {"weights": "last", "step": result.global_step}
    if best is not None and best.best is not None:
        metrics["best"] = best.best
        if best.stopped_early_at is not None:
            metrics["stopped_early_at"] = best.stopped_early_at
            log(f"early stopping at step {best.stopped_early_at}: no better {t.metric_for_best}")
        log(
            f"best checkpoint: {best.directory} (step {best.best['step']}, "
            f"{best.best['metric']} {best.best['value']:.4f})"
        )
        if t.load_best_at_end and prep.test_set is not prep.eval_set:
            load_best_weights(trainer, best.directory)
            final_weights = {"weights": "best", **best.best, "split": "validation"}
        elif t.load_best_at_end:
            log(
                "final/ keeps the last weights (trainer.load_best_at_end): the studies have "
                "no validation split, and best/ was chosen on the held-out records reported below"
            )
    metrics["final"] = final_weights
    test_set = prep.test_set if prep.test_set is not None else prep.eval_set
    if t.eval_strategy == "no":
        test_set = None
    # final/ and metrics.json before the last evaluation: on a large held-out
    # set it can take long, and stopping it must not lose the trained weights.
    trainer.run_meta = run_meta | {"metrics": metrics}
    # Through the Trainer: under ZeRO-3 it gathers the partitioned weights first.
    trainer.save_model(str(final_dir))
    if main_process:
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    if test_set is None and t.eval_strategy == "no":
        log(
            "no evaluation (trainer.eval_strategy=no); the table of the held-out records: "
            f"umbrella evaluate --checkpoint {final_dir}"
        )
    test_metrics: dict[str, float] = {}
    if test_set is not None:
        log(f"evaluating final/ on {len(test_set)} {test_set.name} samples")
        with trainer.compute_loss_context_manager():
            evaluation = evaluate_dataset(
                prep.model,
                test_set,
                collator,
                trainer.questions,
                batch_size=t.batch_size,
                workers=config.data.workers,
                max_new_tokens=t.eval_max_new_tokens,
                progress=t.progress and main_process,
                description=f"evaluating {test_set.name}",
            )
        if main_process:
            add_test_baselines(evaluation, prep, test_set, trainer.questions, pm, log)
        results = evaluation.results
        metrics["held_out"] = results
        metrics["held_out_split"] = test_set.name
        log(f"{test_set.name} answers of final/ = {describe_weights(final_weights)}:")
        log(format_table(evaluation))
        if main_process:
            from umbrella_core.model.exported import CHECKPOINT_META

            meta_path = final_dir / CHECKPOINT_META
            meta = json.loads(meta_path.read_text())
            meta["metrics"] = metrics
            written = meta_path.with_name(f".{CHECKPOINT_META}.tmp")
            written.write_text(json.dumps(meta, indent=2, default=str) + "\n")
            os.replace(written, meta_path)  # a reader never sees half of it
            (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
            test_metrics = summarize(results, "test")
            if "tensorboard" in t.report_to:
                with SummaryWriter(str(logging_dir)) as writer:
                    for name, value in test_metrics.items():
                        writer.add_scalar(name.replace("_", "/", 1), value, result.global_step)
                    log_figures(writer, evaluation, result.global_step, "test")
    # The held-out table to MLflow / W&B too, then their runs end.
    finish_trackers(trainer, test_metrics, result.global_step)
    log(f"checkpoint:  {final_dir}")
    if "tensorboard" in t.report_to:
        log(f"tensorboard: {logging_dir}   (tensorboard --logdir {logging_dir})")
    for line in describe_trackers(trainer):
        log(line)
    return metrics
