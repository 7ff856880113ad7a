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
    p.add_argument(
        "--show-prompt",
        action="store_true",
        help="print the prompt as the model reads it (chat template, special tokens, each "
        "image's tokens) on stderr, before the answer",
    )
    p.add_argument(
        "--save-input",
        metavar="DIR",
        help="write each image as the model reads it (preprocessed, at the run's geometry) "
        "to DIR as NIfTI: input-1-t1.nii.gz, ...",
    )


def _generate(args: argparse.Namespace) -> int:
    from umbrella_core.inference.generate import (
        generate_answer,
        load_for_inference,
        render_prompt,
        save_inputs,
    )
    from umbrella_core.plugins import get_plugin_manager

    pm = get_plugin_manager()
    loaded = load_for_inference(args.checkpoint, pm)
    installed = {name: p.item for name, p in pm.modality_registry().items()}

    def seen(ids: list[int], images: list[tuple[str, object]]) -> None:
        if args.show_prompt:
            shown = render_prompt(loaded.tokenizer, ids, loaded.model.image_token_id)
            print(f"prompt ({len(ids)} tokens):\n{shown}", file=sys.stderr)
        if args.save_input:
            for path in save_inputs(images, args.save_input):
                print(f"model input: {path}", file=sys.stderr)

    answer = generate_answer(
        loaded,
        [[f for f in image.split(",") if f] for image in args.image],
        args.prompt,
        modalities=args.modality or (),
        max_new_tokens=args.max_new_tokens,
        installed=installed,
        seen=seen,
    )
    print(answer)
    if not answer:
        print("umbrella: the answer is empty (the model ended its turn at once)", file=sys.stderr)
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
