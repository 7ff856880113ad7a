"""The ``umbrella export`` command: a checkpoint as a folder to hand on."""

from __future__ import annotations

import argparse

from umbrella_core.hookspecs import hookimpl
from umbrella_core.types import Command

__all__ = ["EXPORT", "umbrella_commands"]


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a checkpoint folder (a run's final/ or best/)")
    p.add_argument("output", help="the folder to write (new or empty, unless --overwrite)")
    p.add_argument(
        "--merge-lora",
        action="store_true",
        help="accepted for old scripts: LoRA adapters are always merged into language/",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export at OUTPUT")


def _export(args: argparse.Namespace) -> int:
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


EXPORT = Command(
    name="export",
    help="write a checkpoint as a folder to hand on: language/ (loads with transformers "
    "alone, LoRA merged), vision.safetensors, umbrella.json and a model card",
    add_arguments=_arguments,
    run=_export,
)


@hookimpl
def umbrella_commands() -> list[Command]:
    return [EXPORT]
