"""The ``umbrella`` command line.

Errors from UMBRELLA become one line on stderr and exit status 2; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from umbrella_core.cli_data import cmd_cache, cmd_demo_data, cmd_validate, data_overrides
from umbrella_core.errors import UmbrellaError

__all__ = ["main", "build_parser"]


def _cmd_plugins(args: argparse.Namespace) -> int:
    from umbrella_core.listing import plugins_listing
    from umbrella_core.plugins import get_plugin_manager

    listing = plugins_listing(get_plugin_manager())
    print(json.dumps(listing.payload, indent=2) if args.json else listing.text)
    return 0 if args.json or not listing.errors else 1


def _cmd_train(args: argparse.Namespace) -> int:
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


def _cmd_generate(args: argparse.Namespace) -> int:
    from umbrella_core.inference.generate import generate_answer, load_for_inference
    from umbrella_core.plugins import get_plugin_manager

    pm = get_plugin_manager()
    loaded = load_for_inference(args.checkpoint, pm)
    installed = {name: p.item for name, p in pm.modality_registry().items()}
    answer = generate_answer(
        loaded,
        [[f for f in image.split(",") if f] for image in args.image],
        args.prompt,
        modalities=args.modality or (),
        max_new_tokens=args.max_new_tokens,
        installed=installed,
    )
    print(answer)
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from umbrella_core.plugins import get_plugin_manager
    from umbrella_core.train.evaluate import evaluate_checkpoint, format_table, write_report

    log = (lambda _: None) if args.json else print
    evaluation = evaluate_checkpoint(
        args.checkpoint,
        get_plugin_manager(),
        studies=args.study or (),
        split=args.split,
        batch_size=args.batch_size,
        max_samples=args.max_samples,
        progress=not args.json and sys.stderr.isatty(),
        log=log,
    )
    output = Path(args.output or Path(args.checkpoint) / f"evaluation-{args.split}")
    written = write_report(evaluation, output)
    if args.json:
        print(json.dumps(evaluation.results, indent=2))
    else:
        print(format_table(evaluation))
        print(
            f"written to {output}: metrics.json, predictions.jsonl, "
            f"{len(written['figures'])} figure(s) in figures/"
        )
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from umbrella_core.export.folder import export_checkpoint
    from umbrella_core.plugins import get_plugin_manager

    folder, merged = export_checkpoint(
        args.checkpoint, args.output, get_plugin_manager(), overwrite=args.overwrite
    )
    if args.merge_lora and not merged:
        print(f"{args.checkpoint} has no LoRA adapters: nothing to merge")
    print(
        f"exported {args.checkpoint} to {folder}: language/ (a transformers causal LM"
        + (", LoRA merged" if merged else "")
        + "), vision.safetensors, umbrella.json, README.md (the model card)"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="umbrella",
        description="Train LLaVA-style vision-language models on brain MRI.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plugins", help="list installed plugins and the modalities they provide")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_plugins)

    p = sub.add_parser("train", help="train a model (with no --data: on the built-in demo)")
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
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("demo-data", help="write the demo study (phantom .nii.gz files + manifest)")
    p.add_argument("directory")
    p.add_argument("--modalities", help="comma-separated (default: every installed one)")
    p.add_argument("--subjects", type=int, default=240, help="subjects per modality")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo_data)

    p = sub.add_parser(
        "validate",
        help="check studies (records, conversations, image files) and report every problem",
    )
    p.add_argument("locations", nargs="*", metavar="LOCATION", help="a study, as for train --study")
    p.add_argument(
        "--config",
        help="a run's YAML config: also check its data.studies (with their reader options) "
        "and apply its data.preprocessing settings",
    )
    p.add_argument(
        "--set",
        action="append",
        metavar="SECTION.KEY=VALUE",
        help="override a config setting, as for train",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser(
        "cache",
        help="build, inspect or verify the preprocessed-image cache (decode each file once)",
        description=(
            "build: preprocess the run's images into the cache (entries already there are "
            "checked; corrupt ones are rebuilt). info: entries and size per modality; "
            "temporary files of killed builds are not counted, and are removed once their "
            "writer is dead or they are an hour old. verify: read every entry in full "
            "(checksum, shape, dtype, no NaN or infinite value) and list the corrupt ones; "
            "with no --config, --study, --modalities or --set it checks the whole cache "
            "folder and removes corrupt entries (they are rebuilt on their next read or "
            "'cache build'); with them, only the run's entries, and corrupt ones are "
            "rebuilt from their source files. Exit status 1 when any entry was corrupt."
        ),
    )
    p.add_argument("action", choices=["build", "info", "verify"])
    p.add_argument("--study", "--data", dest="study", action="append", metavar="LOCATION")
    p.add_argument("--modalities", help="comma-separated (default: every installed one)")
    p.add_argument("--config", help="YAML run configuration (its geometry decides the shapes)")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE")
    p.add_argument("--cache-dir", help="default: data.cache_dir or $UMBRELLA_CACHE/preprocessed")
    p.add_argument(
        "--cache-dtype",
        choices=["float32", "float16"],
        help="how entries are stored (data.cache_dtype; default float32): build and verify "
        "the entries of that dtype, as a run with it reads them",
    )
    p.add_argument("--workers", type=int, default=1, help="processes that preprocess")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="verify: only list corrupt entries; remove and rebuild nothing",
    )
    p.set_defaults(func=cmd_cache)

    p = sub.add_parser("generate", help="answer a question about images with a trained checkpoint")
    p.add_argument(
        "--checkpoint", required=True, help="a checkpoint folder (a run's final/ or best/)"
    )
    p.add_argument(
        "--image",
        action="append",
        required=True,
        metavar="FILE[,FILE...]",
        help="an image (repeatable, in placeholder order); commas join the files of one "
        "multi-file image, e.g. sub-01_FA.nii.gz,sub-01_MD.nii.gz",
    )
    p.add_argument(
        "--modality",
        action="append",
        help="modality of every image, or one per --image (default: from the file names)",
    )
    p.add_argument(
        "--prompt", required=True, help="the question; <image> lines are put first if absent"
    )
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser(
        "evaluate",
        help="a checkpoint's held-out metrics per modality and question, with figures",
    )
    p.add_argument(
        "--checkpoint", required=True, help="a checkpoint folder (a run's final/ or best/)"
    )
    p.add_argument(
        "--study",
        "--data",
        dest="study",
        action="append",
        metavar="LOCATION",
        help="evaluate on this study (repeatable; default: the checkpoint's own studies)",
    )
    p.add_argument(
        "--split",
        default="test",
        help="test (default), validation, train, or held-out (everything but train)",
    )
    p.add_argument("--batch-size", type=int)
    p.add_argument(
        "--max-samples",
        type=int,
        default=0,
        help="score this many samples, evenly spread over the split (default: all)",
    )
    p.add_argument(
        "--output",
        help="folder for metrics.json, predictions.jsonl and figures/*.png "
        "(default: CHECKPOINT/evaluation-SPLIT)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser(
        "export",
        help="write a checkpoint as a folder to hand on: language/ (loads with transformers "
        "alone, LoRA merged), vision.safetensors, umbrella.json and a model card",
    )
    p.add_argument("checkpoint", help="a checkpoint folder (a run's final/ or best/)")
    p.add_argument("output", help="the folder to write (new or empty, unless --overwrite)")
    p.add_argument(
        "--merge-lora",
        action="store_true",
        help="accepted for old scripts: LoRA adapters are always merged into language/",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUTPUT")
    p.set_defaults(func=_cmd_export)

    from umbrella_core.serve import add_serve_parser

    add_serve_parser(sub)

    from umbrella_core.launch import add_launch_parser

    add_launch_parser(sub)  # after train: its parser checks the train arguments
    return parser


def _one_line(exc: BaseException) -> str:
    """The error's message; for one re-raised from a DataLoader worker, the original line.

    torch re-raises a worker's error as ``Caught DataError in DataLoader worker
    process 0. Original Traceback ...``: the user's line is the last one.
    """
    message = str(exc)
    if "\nOriginal Traceback" not in message:
        return message
    kind = type(exc)
    for prefix in (f"{kind.__module__}.{kind.__qualname__}: ", f"{kind.__name__}: "):
        at = message.rfind(prefix)
        if at >= 0:
            return message[at + len(prefix) :].strip()
    return message.rstrip().splitlines()[-1]


def _quiet_library_notices() -> None:
    """Keep notices a user can do nothing about off every run's output.

    DeepSpeed (imported by transformers' Trainer when installed) logs
    ``Setting accelerator to CPU`` at WARNING on each start without a GPU.
    """
    import logging

    deepspeed = logging.getLogger("DeepSpeed")
    if not any(getattr(f, "umbrella", False) for f in deepspeed.filters):

        def no_cpu_notice(record: logging.LogRecord) -> bool:
            return not str(record.msg).startswith("Setting accelerator to CPU")

        no_cpu_notice.umbrella = True  # type: ignore[attr-defined]
        deepspeed.addFilter(no_cpu_notice)


def _end_progress_bars() -> None:
    """End the line of a progress bar the error interrupted: the error gets a line of its own."""
    tqdm = sys.modules.get("tqdm")
    # Closing a bar ends its line (or clears it, for one that does not stay).
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ()) or ()):
        bar.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_library_notices()
    try:
        return int(args.func(args) or 0)
    except UmbrellaError as exc:
        if args.debug:
            raise
        _end_progress_bars()
        print(f"umbrella: error: {_one_line(exc)}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)  # TrainingInterrupted: 128 + signal number
    except KeyboardInterrupt:
        print("umbrella: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
