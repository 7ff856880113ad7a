"""``umbrella train``: from a configuration to a trained, evaluated checkpoint."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from umbrella_core.config import RunConfig, StudyConfig
from umbrella_core.data.dataset import RecordDataset, group_records
from umbrella_core.errors import ConfigError, DataError
from umbrella_core.plugins import PluginManager
from umbrella_core.types import ModalitySpec, StudyRecord

__all__ = ["Prepared", "StudyData", "resolve_specs", "read_studies", "prepare", "train"]


@attrs.define
class Prepared:
    """Everything a training run is made of, before the first step."""

    config: RunConfig
    specs: dict[str, ModalitySpec]
    provenance: dict[str, tuple[str, str, str]]
    model: Any
    tokenizer: Any
    train_sets: list[RecordDataset]
    eval_set: RecordDataset | None
    studies: list[str]
    weights: list[float]
    skipped: dict[str, int]
    problems: list[Any]
    trainable: str
    base_is_random: bool


def configure_spec(spec: ModalitySpec, settings: Any) -> ModalitySpec:
    """``spec`` with ``data.preprocessing.<name>`` applied by its plugin's ``configure``."""
    if not settings:
        return spec
    key = f"data.preprocessing.{spec.name}"
    if not isinstance(settings, dict):
        raise ConfigError(f"{key}: expected a mapping of settings, got {settings!r}")
    if spec.configure is None:
        raise ConfigError(f"{key}: the {spec.name} plugin takes no preprocessing settings")
    try:
        configured = spec.configure(spec, dict(settings))
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{key}: {exc}") from None
    if not isinstance(configured, ModalitySpec) or configured.name != spec.name:
        raise ConfigError(
            f"{key}: the {spec.name} plugin's configure returned {configured!r}, "
            "not a ModalitySpec of that modality"
        )
    return configured


def resolve_specs(
    config: RunConfig, pm: PluginManager, *, demo: bool
) -> tuple[dict[str, ModalitySpec], dict[str, tuple[str, str, str]]]:
    """Active modalities in canonical (sorted) order, with the run's geometry."""
    names = config.data.modalities or tuple(pm.modality_registry())
    if not names:
        raise ConfigError("no modality plugin is installed: pip install umbrella-t1 (or another)")
    provided = {}
    for name in names:
        p = pm.resolve_modality(name)
        provided[p.item.name] = p
    specs: dict[str, ModalitySpec] = {}
    provenance: dict[str, tuple[str, str, str]] = {}
    for section in ("geometry", "preprocessing"):
        unknown = set(getattr(config.data, section)) - set(provided)
        if unknown:
            raise ConfigError(
                f"data.{section}: {sorted(unknown)[0]!r} is not an active modality "
                f"(active: {', '.join(sorted(provided))})"
            )
    for name in sorted(provided):
        spec = provided[name].item
        if demo:
            spec = spec.for_demo()
        override = config.data.geometry.get(name, {})
        bad = set(override) - {"shape", "patch_size", "window_stride"}
        if bad:
            raise ConfigError(
                f"data.geometry.{name}: unknown key {sorted(bad)[0]!r} "
                "(shape, patch_size, window_stride)"
            )
        try:
            spec = spec.with_geometry(override.get("shape"), override.get("patch_size"))
            if "window_stride" in override:
                spec = attrs.evolve(spec, window_stride=override["window_stride"])
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"data.geometry.{name}: {exc}") from None
        spec = configure_spec(spec, config.data.preprocessing.get(name))
        specs[name] = spec
        provenance[name] = (
            provided[name].plugin,
            provided[name].distribution,
            provided[name].version,
        )
    return specs, provenance


def screen_records(
    per_study: list[list[StudyRecord]],
    *,
    check: str,
    encode: Callable[[StudyRecord], Any],
    pm: PluginManager,
    specs: dict[str, ModalitySpec] | None = None,
) -> tuple[list[list[StudyRecord]], list[Any]]:
    """Split records into usable ones and problems, before step 1 (I6).

    ``check`` is ``files`` (every image file exists, every conversation encodes
    within the model's length) or ``full`` (also decode and preprocess every
    image, as ``umbrella validate`` does) or ``none`` (encoding only).
    """
    from umbrella_core.validate import Problem, problem_from_error, validate_records

    problems: list[Problem] = []
    bad: set[int] = set()
    everything = [r for records in per_study for r in records]
    for record in everything:
        source = record.source or f"subject {record.subject}"
        if check in ("files", "full"):
            for i, image in enumerate(record.images):
                for path in image.paths:
                    if not os.path.isfile(path):
                        problems.append(
                            Problem(source, f"images[{i}].path", f"{path}: image file not found")
                        )
                        bad.add(id(record))
        try:
            encode(record)
        except DataError as error:
            problems.append(problem_from_error(error, source))
            bad.add(id(record))
    if check == "full":
        by_source = {r.source: r for r in everything if id(r) not in bad}
        usable = [r for r in everything if id(r) not in bad]
        for problem in validate_records(usable, pm, specs=specs):
            problems.append(problem)
            record = by_source.get(problem.source)
            if record is not None:
                bad.add(id(record))
    kept = [[r for r in records if id(r) not in bad] for records in per_study]
    return kept, problems


@attrs.define
class StudyData:
    """The records of a run's studies, with the active modalities they use."""

    specs: dict[str, ModalitySpec]
    provenance: dict[str, tuple[str, str, str]]
    studies: list[StudyConfig]
    per_study: list[list[StudyRecord]]
    skipped: dict[str, int]

    @property
    def locations(self) -> list[str]:
        return [study.location for study in self.studies]

    @property
    def records(self) -> list[StudyRecord]:
        return [r for records in self.per_study for r in records]

    def versions(self) -> dict[str, str]:
        return plugin_versions(self.provenance)


def plugin_versions(provenance: dict[str, tuple[str, str, str]]) -> dict[str, str]:
    """Modality → ``distribution==version`` of its plugin, for cache keys."""
    return {n: f"{d}=={v}" for n, (_, d, v) in provenance.items()}


def read_studies(
    config: RunConfig, pm: PluginManager, *, log: Callable[[str], None] = print
) -> StudyData:
    """Resolve the active modalities and read every study's records (the demo without studies).

    Records of inactive modalities are counted in ``skipped``; images named by
    alias get their canonical modality name. Files are checked later, by
    :func:`screen_records`.
    """
    from umbrella_core.data.demo import cached_demo

    demo = not config.data.studies
    specs, provenance = resolve_specs(config, pm, demo=demo)
    studies = list(config.data.studies)
    if demo:
        log(
            "no --study given: using the built-in demo "
            f"({config.data.demo_subjects} subjects per modality)"
        )
        manifest = cached_demo(
            specs,
            plugin_versions(provenance),
            subjects=config.data.demo_subjects,
            seed=0,
        )
        studies = [StudyConfig(location=str(manifest))]
    records: list[StudyRecord] = []
    per_study: list[list[StudyRecord]] = []
    skipped: dict[str, int] = {}
    for study in studies:
        per_study.append([])
        for record in pm.read_study(study.location, study.options):
            inactive = [m for m in record.modalities if m not in specs]
            if inactive:
                # Modalities may be named by alias in a manifest.
                try:
                    names = [pm.resolve_modality(m).item.name for m in record.modalities]
                except Exception:
                    names = record.modalities
                if all(n in specs for n in names):
                    record = attrs.evolve(
                        record,
                        images=[
                            attrs.evolve(i, modality=n)
                            for i, n in zip(record.images, names, strict=False)
                        ],
                    )
                else:
                    skipped[record.modality_key] = skipped.get(record.modality_key, 0) + 1
                    continue
            records.append(record)
            per_study[-1].append(record)
    locations = [study.location for study in studies]
    if not records:
        raise DataError(
            f"no record of the active modalities ({', '.join(specs)}) in {', '.join(locations)}"
        )
    return StudyData(specs, provenance, studies, per_study, skipped)


def prepare(
    config: RunConfig, pm: PluginManager, *, log: Callable[[str], None] = print
) -> Prepared:
    """Resolve plugins, read studies, build the model; nothing is trained yet."""
    from umbrella_core.model.build import build_model, load_base

    data = read_studies(config, pm, log=log)
    specs, provenance, studies = data.specs, data.provenance, data.studies
    per_study, skipped, locations = data.per_study, data.skipped, data.locations

    llava, tokenizer, is_random = load_base(config.model.base, seed=config.trainer.seed)
    terms = pm.loss_terms(tuple(specs), dict(config.loss))
    model = build_model(llava, specs, pm.patch_embedder, loss_terms=terms, seed=config.trainer.seed)
    trainable = config.model.trainable
    if trainable == "auto":
        trainable = "full" if is_random else "embedders"
    model.set_trainable(trainable)

    cache = None
    if config.data.cache:
        from umbrella_core.data.cache import PreprocessedCache, default_cache_root

        cache = PreprocessedCache(config.data.cache_dir or default_cache_root(), data.versions())

    probe = RecordDataset(
        [],
        specs,
        tokenizer=tokenizer,
        image_token_id=model.image_token_id,
        max_length=config.model.max_length,
    )
    per_study, problems = screen_records(
        per_study, check=config.data.check, encode=probe.encode, pm=pm, specs=specs
    )
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

    def dataset(group: list[StudyRecord], name: str) -> RecordDataset:
        return RecordDataset(
            group,
            specs,
            tokenizer=tokenizer,
            image_token_id=model.image_token_id,
            max_length=config.model.max_length,
            name=name,
            cache=cache,
        )

    train_sets: list[RecordDataset] = []
    weights: list[float] = []
    weighted = [s.weight for s in studies if s.weight is not None]
    default_weight = (sum(weighted) / len(weighted)) if weighted else None
    for study, study_records in zip(studies, per_study, strict=True):
        groups = group_records([r for r in study_records if r.split == "train"])
        # Sizes in samples, not records: a long fMRI series is several windows.
        sets = {name: dataset(group, name) for name, group in groups.items()}
        total = sum(len(ds) for ds in sets.values())
        share = study.weight if study.weight is not None else default_weight
        for name, ds in sets.items():
            weight = len(ds) if share is None else share * len(ds) / total
            train_sets.append(ds)
            weights.append(float(config.data.weights.get(name, weight)))
    if not train_sets:
        raise DataError(f"no training record (split: train) in {', '.join(locations)}")
    held_out = [r for r in data.records if r.split != "train"]
    eval_set = dataset(held_out, "held-out") if held_out else None
    return Prepared(
        config=config,
        specs=specs,
        provenance=provenance,
        model=model,
        tokenizer=tokenizer,
        train_sets=train_sets,
        eval_set=eval_set,
        studies=locations,
        weights=weights,
        skipped=skipped,
        problems=problems,
        trainable=trainable,
        base_is_random=is_random,
    )


def summary(prep: Prepared) -> str:
    """The start-of-run summary: modalities and plugins, parameters, samples."""
    model = prep.model
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lines = [
        "UMBRELLA training run",
        f"  base model   {prep.config.model.base}"
        + (" (random weights, built-in)" if prep.base_is_random else ""),
    ]
    lines.append(
        f"  trainable    {prep.trainable}: {trainable:,} of {total:,} parameters "
        f"({trainable / total:.1%})"
    )
    lines.append("  modalities")
    counts: dict[str, int] = {}
    for ds in prep.train_sets:
        for record in ds.records:
            for m in set(record.modalities):
                counts[m] = counts.get(m, 0) + 1
    for name, spec in prep.specs.items():
        plugin, dist, version = prep.provenance[name]
        lines.append(
            f"    {name:<8} {dist} {version}  shape {'x'.join(map(str, spec.input_shape))}  "
            f"patch {'x'.join(map(str, spec.patch_size))}  {spec.num_tokens} tokens/image  "
            f"{counts.get(name, 0)} training samples"
        )
    lines.append("  studies")
    total_weight = sum(prep.weights)
    for ds, weight in zip(prep.train_sets, prep.weights, strict=True):
        lines.append(f"    {ds.name:<24} {len(ds)} samples, {weight / total_weight:.0%} of draws")
    if prep.eval_set is not None:
        lines.append(f"    {'(held out)':<24} {len(prep.eval_set)} samples")
    for key, n in sorted(prep.skipped.items()):
        lines.append(f"  skipped {n} record(s) of {key}: modality not active in this run")
    if prep.problems:
        lines.append(
            f"  skipped {len(prep.problems)} bad sample(s), listed in OUTPUT_DIR/bad_samples.json"
        )
    return "\n".join(lines)


def train(
    config: RunConfig, pm: PluginManager, *, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Run training end to end; returns the final metrics (also written to ``metrics.json``)."""
    import torch
    from torch.utils.data import ConcatDataset
    from torch.utils.tensorboard import SummaryWriter
    from transformers import TrainingArguments
    from transformers.integrations import TensorBoardCallback
    from transformers.utils import logging as hf_logging

    from umbrella_core.data.collate import UmbrellaCollator
    from umbrella_core.data.interleave import Interleaving
    from umbrella_core.model.build import save_checkpoint
    from umbrella_core.train.evaluate import answer_accuracy, format_table
    from umbrella_core.train.trainer import UmbrellaTrainer

    hf_logging.set_verbosity_error()
    torch.manual_seed(config.trainer.seed)
    prep = prepare(config, pm, log=log)
    log(summary(prep))
    t = config.trainer
    out_dir = Path(t.output_dir).expanduser().resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    if prep.problems:
        (out_dir / "bad_samples.json").write_text(
            json.dumps([p.to_json() for p in prep.problems], indent=2) + "\n"
        )
    interleaving = Interleaving([len(ds) for ds in prep.train_sets], prep.weights)
    collator = UmbrellaCollator(prep.tokenizer.pad_token_id, tuple(prep.specs))
    logging_dir = out_dir / "tensorboard"
    args = TrainingArguments(
        output_dir=str(out_dir),
        max_steps=t.max_steps if t.max_steps > 0 else -1,
        num_train_epochs=t.epochs,
        per_device_train_batch_size=t.batch_size,
        learning_rate=t.learning_rate,
        warmup_steps=int(math.ceil(t.warmup_ratio * max(t.max_steps, 1))) if t.max_steps > 0 else 0,
        weight_decay=t.weight_decay,
        lr_scheduler_type="cosine",
        logging_steps=t.logging_steps,
        report_to="none",  # TensorBoard is added below, writing where we say
        save_strategy="steps" if t.save_steps > 0 else "no",
        save_steps=t.save_steps if t.save_steps > 0 else 500,
        save_only_model=True,
        seed=t.seed,
        data_seed=t.seed,
        remove_unused_columns=False,
        dataloader_num_workers=config.data.workers,
        disable_tqdm=not t.progress,
        use_cpu=not torch.cuda.is_available(),
        label_names=["labels"],
    )
    run_meta = {
        "config": config.to_dict(),
        "studies": prep.studies,
        "trainable": prep.trainable,
        "base_model": config.model.base,
    }
    trainer = UmbrellaTrainer(
        model=prep.model,
        args=args,
        train_dataset=ConcatDataset(prep.train_sets),
        data_collator=collator,
        processing_class=prep.tokenizer,
        interleaving=interleaving,
        provenance=prep.provenance,
        run_meta=run_meta,
        callbacks=[TensorBoardCallback(tb_writer=SummaryWriter(str(logging_dir)))],
    )
    started = time.perf_counter()
    result = trainer.train()
    elapsed = time.perf_counter() - started
    final_dir = out_dir / "final"
    metrics: dict[str, Any] = {
        "train_loss": result.training_loss,
        "steps": result.global_step,
        "train_seconds": round(elapsed, 1),
    }
    if prep.eval_set is not None:
        results = answer_accuracy(prep.model, prep.eval_set, collator, batch_size=t.batch_size)
        metrics["held_out"] = results
        log("held-out answers (greedy answer equals the reference):")
        log(format_table(results))
        with SummaryWriter(str(logging_dir)) as writer:
            for key, r in results.items():
                writer.add_scalar(f"eval/accuracy/{key}", r["accuracy"], result.global_step)
                writer.add_scalar(f"eval/loss/{key}", r["loss"], result.global_step)
    save_checkpoint(
        prep.model,
        prep.tokenizer,
        final_dir,
        provenance=prep.provenance,
        extra=run_meta | {"metrics": metrics},
    )
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    log(f"checkpoint:  {final_dir}")
    log(f"tensorboard: {logging_dir}   (tensorboard --logdir {logging_dir})")
    return metrics
