"""``umbrella train``: from a configuration to a trained, evaluated checkpoint.

A run is five phases, in order: assemble the data (:mod:`umbrella_core.data.assemble`:
read, screen, split, augmentation plan, weights, held-out sets), build the model
(:func:`umbrella_core.model.start.start_model`), build the trainer
(:func:`build_trainer`), fit, and finish (:mod:`umbrella_core.train.finish`:
``final/``, the metrics, the test table, the trackers).
"""

from __future__ import annotations

import errno
import json
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from umbrella_core.config import RunConfig
from umbrella_core.data.assemble import assemble_data
from umbrella_core.data.packed import ready_for_workers
from umbrella_core.data.studies import StudyData, check_headers_once, read_studies
from umbrella_core.errors import ConfigError, DataError, ModelError, OutputError
from umbrella_core.plugins import PluginManager
from umbrella_core.train import arguments
from umbrella_core.train.prepared import Prepared, summary

__all__ = ["prepare", "build_trainer", "train"]


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
    """:func:`train` once it holds its output folder: the phases, in order."""
    from umbrella_core.train.finish import finish

    main_process = args.process_index == 0
    _import_model_stack()
    with args.main_process_first(desc="reading studies", local=False):
        data = read_studies(config, pm, log=log)
        check_headers_once(data, config, log=log)
    prep = prepare(config, pm, log=log, data=data)
    _check_batch(prep, args)
    log(summary(prep))
    if resume is not None:
        log(f"resuming from {resume}")
    # Screened and built: only now may --overwrite remove the earlier run.
    clear_earlier_run()
    out_dir.mkdir(parents=True, exist_ok=True)
    if main_process:
        _write_inputs(prep, data, out_dir)
    trainer, best = build_trainer(prep, args, out_dir, pm, log)
    if config.data.workers:
        del data  # the records' objects: the datasets keep them packed
        ready_for_workers(prep.datasets())
    result = _fit(trainer, resume, out_dir, log)
    return finish(trainer, best, prep, result, out_dir, pm, log)


def prepare(
    config: RunConfig,
    pm: PluginManager,
    *,
    log: Callable[[str], None] = print,
    data: StudyData | None = None,
) -> Prepared:
    """Assemble the run's data (reading its studies unless ``data`` holds them), then its model.

    Nothing is trained yet. In a distributed run every rank calls this: under
    ZeRO-3 building the model is a collective (parameters are partitioned as
    they are created), so only :func:`read_studies` may run on one rank first.
    """
    from umbrella_core.model.start import start_model

    if data is None:
        data = read_studies(config, pm, log=log)
    assembled = assemble_data(config, pm, data, log=log)
    specs = assembled.studies.specs
    terms = pm.loss_terms(tuple(specs), dict(config.loss))
    started = start_model(config.model, specs, pm, loss_terms=terms, seed=config.trainer.seed)
    tokenization = assembled.tokenization
    _check_length(config, started.model)
    if started.model.image_token_id != tokenization.image_token_id:
        raise ModelError(  # both come from one tokenizer: a builder that disagrees is a bug
            f"model.base: the model's image token is {started.model.image_token_id}, its "
            f"tokenizer's {tokenization.image_token_id}"
        )
    return Prepared(config=config, data=assembled, started=started)


def _check_length(config: RunConfig, model: Any) -> None:
    """Refuse a ``model.max_length`` the language model cannot attend over."""
    text = model.config.get_text_config()
    most = getattr(text, "max_position_embeddings", None)
    if most is not None and config.model.max_length > most:
        raise ConfigError(
            f"model.max_length: {config.model.max_length} tokens, but the language model "
            f"takes at most {most} (its max_position_embeddings); give {most} or less"
        )


def _check_batch(prep: Prepared, args: Any) -> None:
    """Refuse an optimizer step larger than the training samples: each step would be an
    epoch of repeated samples, which nobody asks for on purpose."""
    step = args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps
    samples = sum(len(ds) for ds in prep.train_sets)
    if step > samples:
        raise ConfigError(
            f"trainer.batch_size: an optimizer step of {step} samples (batch size "
            f"{args.per_device_train_batch_size} x {args.world_size} process(es) x "
            f"{args.gradient_accumulation_steps} accumulation) is more than the {samples} "
            "training samples; give a smaller batch size"
        )


def _write_inputs(prep: Prepared, data: StudyData, out_dir: Path) -> None:
    """What the run was given, beside its outputs: the split and the refused samples."""
    if data.split is not None:
        from umbrella_core.data.split_table import SPLIT_FILE

        # Subject -> side, given back with data.split.file to reproduce it (I10).
        data.split.write(out_dir / SPLIT_FILE)
    if prep.problems:
        from umbrella_core.validate import distinct_problems

        listed = [p.to_json() | {"records": n} for p, n in distinct_problems(prep.problems)]
        (out_dir / "bad_samples.json").write_text(json.dumps(listed, indent=2) + "\n")


def build_trainer(
    prep: Prepared, args: Any, out_dir: Path, pm: PluginManager, log: Callable[[str], None]
) -> tuple[Any, Any]:
    """The Trainer of the run (its interleaved sampler, collator, evaluation and trackers),
    and the keeper of its best checkpoint (None when it does not evaluate)."""
    from umbrella_core.data.collate import UmbrellaCollator
    from umbrella_core.data.interleave import Interleaving
    from umbrella_core.evaluation.engine import index_questions
    from umbrella_core.train.callbacks import attach_evaluation, check_evaluation
    from umbrella_core.train.trackers import tracker_callbacks
    from umbrella_core.train.trainer import UmbrellaTrainer

    config, t = prep.config, prep.config.trainer
    main_process = args.process_index == 0
    # Each question's metric family, from every record of the run (a small
    # held-out set alone could make a closed question look open).
    questions = index_questions(
        [r for ds in prep.datasets() for r in ds.records], pm.metric_families(config.evaluation)
    )
    evaluating = check_evaluation(args, prep, questions, log)
    trainer = UmbrellaTrainer(
        model=prep.model,
        args=args,
        train_dataset=_training_dataset(prep, out_dir, main_process),
        eval_dataset=prep.eval_set if evaluating else None,
        data_collator=UmbrellaCollator(prep.tokenizer.pad_token_id, tuple(prep.specs)),
        processing_class=prep.tokenizer,
        interleaving=Interleaving.of_datasets(
            prep.train_sets, prep.weights, config.data.batching, log
        ),
        provenance=prep.provenance,
        run_meta=run_meta(prep),
        questions=questions,
        eval_max_samples=t.eval_max_samples,
        eval_max_new_tokens=t.eval_max_new_tokens,
        # trainer.report_to, from the main process only (one event file, one run).
        callbacks=tracker_callbacks(t.report_to, out_dir, config) if main_process else [],
    )
    best = attach_evaluation(trainer, config, prep, out_dir) if evaluating else None
    return trainer, best


def run_meta(prep: Prepared) -> dict[str, Any]:
    """What every checkpoint of the run records about it (``umbrella.json``)."""
    return {
        "config": prep.config.to_dict(),
        "studies": prep.studies,
        "trainable": prep.trainable,
        "base_model": prep.config.model.base,
    }


def _training_dataset(prep: Prepared, out_dir: Path, main_process: bool) -> Any:
    """The training samples, augmented where ``data.augment`` says (held-out ones never)."""
    from torch.utils.data import ConcatDataset, Dataset

    if not prep.augment:
        # RecordDatasets are map-style datasets by their methods, not by subclassing.
        return ConcatDataset(cast("list[Dataset[Any]]", prep.train_sets))
    from torch.utils.tensorboard import SummaryWriter

    from umbrella_core.data.augmented import AugmentedDataset, log_augmented_slices

    config = prep.config
    dataset = AugmentedDataset(
        prep.train_sets, prep.augment, seed=config.trainer.seed, laterality=config.data.laterality
    )
    if main_process and "tensorboard" in config.trainer.report_to:
        with SummaryWriter(str(out_dir / "tensorboard")) as writer:
            log_augmented_slices(writer, dataset)
    return dataset


def _fit(trainer: Any, resume: str | None, out_dir: Path, log: Callable[[str], None]) -> Any:
    """``trainer.train()``, stopped by SIGINT/SIGTERM with a checkpoint saved."""
    from umbrella_core.train.faults import interrupted_error, stop_on_signals

    with stop_on_signals(trainer, log=log) as stopper:
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
    return result


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


def _quiet(*_: Any) -> None:
    """``log`` of the processes other than the main one."""
