"""``umbrella train``: its arguments, as configuration overrides, and the run."""

from __future__ import annotations

import argparse
import json
import sys

from umbrella_core.commands.data import data_overrides
from umbrella_core.types import Command

__all__ = ["TRAIN", "add_train_arguments"]


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """What to train on and from: studies, modalities, the model and what of it trains."""
    p.add_argument("--config", help="YAML run configuration")
    p.add_argument("--modalities", help="comma-separated modalities (default: every installed one)")
    p.add_argument(
        "--study",
        "--data",
        dest="study",
        action="append",
        metavar="LOCATION",
        help="a study: a manifest .json/.jsonl, a folder holding one, or kind:PATH "
        "for a study plugin (bids:/data/ds); repeatable",
    )
    p.add_argument(
        "--model",
        help="base model: tiny (default), a LLaVA checkpoint folder / hub id, or an "
        "UMBRELLA checkpoint (a run's final/)",
    )
    p.add_argument(
        "--language",
        help="compose a new model from this causal language model (folder or hub id): "
        "patch embedders + vision body + new projector in front of it",
    )
    p.add_argument(
        "--vision",
        help="vision body of a composed model: fresh (default), none, or a CLIP/SigLIP folder",
    )
    p.add_argument("--trainable", choices=["auto", "embedders", "projector", "lora", "full"])
    p.add_argument(
        "--recipe",
        choices=["two-stage"],
        help="train in stages, each from the previous one's checkpoint (OUTPUT_DIR/stage-N): "
        "two-stage = embedders + projector, then LoRA on the language model too",
    )
    _add_run_arguments(p)


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    """How the run goes: its folder, length, batch, rate, overrides, engine and resumption."""
    p.add_argument("--output-dir")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--demo-subjects", type=int, help="subjects per modality in the built-in demo")
    p.add_argument(
        "--set",
        action="append",
        metavar="SECTION.KEY=VALUE",
        help="override any setting, e.g. --set trainer.logging_steps=5",
    )
    p.add_argument(
        "--deepspeed",
        metavar="zero2|zero3|FILE",
        help="train with DeepSpeed ZeRO (the shipped stage 2 or 3 config, or your JSON)",
    )
    p.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        metavar="CHECKPOINT",
        help="continue from the latest checkpoint in the output folder (or the one given), "
        "with the same samples and losses as an uninterrupted run",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="remove an earlier run's outputs in the output folder first (trainer.overwrite)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--cache", action="store_true", help="use the preprocessed-image cache (data.cache)"
    )


def _run(args: argparse.Namespace) -> int:
    from umbrella_core.config import load_config
    from umbrella_core.plugins import get_plugin_manager
    from umbrella_core.train.recipes import run

    overrides = data_overrides(args)
    for flag, key in (
        ("model", "model.base"),
        ("language", "model.language"),
        ("vision", "model.vision"),
        ("trainable", "model.trainable"),
        ("output_dir", "trainer.output_dir"),
        ("max_steps", "trainer.max_steps"),
        ("batch_size", "trainer.batch_size"),
        ("lr", "trainer.learning_rate"),
        ("seed", "trainer.seed"),
        ("demo_subjects", "data.demo_subjects"),
        ("deepspeed", "trainer.deepspeed"),
        ("resume", "trainer.resume"),
    ):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={value}")
    if args.no_progress:
        overrides.append("trainer.progress=false")
    if args.overwrite:
        overrides.append("trainer.overwrite=true")
    if args.cache:
        overrides.append("data.cache=true")
    if args.recipe:
        from umbrella_core.train.recipes import recipe_stages

        overrides.append("stages=" + json.dumps(list(recipe_stages(args.recipe))))
    config = load_config(args.config, overrides)
    try:
        run(config, get_plugin_manager())
    except BaseException:
        _end_process_group()
        raise
    if _end_process_group():
        # A finished distributed run exits here: in interpreter teardown a
        # gloo worker thread of a DeepSpeed ZeRO-3 run is sometimes unwound and
        # aborts the process (SIGABRT) after everything was written.
        import logging
        import os

        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def _end_process_group() -> bool:
    """Shut down the process group (torchrun, accelerate, DeepSpeed); whether there was one."""
    if "torch.distributed" not in sys.modules:
        return False
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return False
    dist.destroy_process_group()
    return True


TRAIN = Command(
    name="train",
    help="train a model (with no --data: on the built-in demo)",
    add_arguments=add_train_arguments,
    run=_run,
)
