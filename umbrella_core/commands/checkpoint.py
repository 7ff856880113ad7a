"""``umbrella generate`` and ``umbrella evaluate``: a trained checkpoint's answers."""

from __future__ import annotations

import argparse
import json
import sys

from umbrella_core.types import Command

__all__ = ["GENERATE", "EVALUATE"]


def _generate_arguments(p: argparse.ArgumentParser) -> None:
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


def _generate(args: argparse.Namespace) -> int:
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


def _evaluate_arguments(p: argparse.ArgumentParser) -> None:
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


def _evaluate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from umbrella_core.evaluation.checkpoint import evaluate_checkpoint
    from umbrella_core.evaluation.report import format_table, write_report
    from umbrella_core.plugins import get_plugin_manager

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


GENERATE = Command(
    name="generate",
    help="answer a question about images with a trained checkpoint",
    add_arguments=_generate_arguments,
    run=_generate,
)
EVALUATE = Command(
    name="evaluate",
    help="a checkpoint's held-out metrics per modality and question, with figures",
    add_arguments=_evaluate_arguments,
    run=_evaluate,
)
