"""Training recipes: stages that run one after the other, each from the previous one's weights.

A run's ``stages`` is a list of overrides of its own configuration, one mapping
per stage, with dotted keys (``{model.trainable: lora, trainer.max_steps: 200}``)
or nested sections (``{model: {trainable: lora}}``). Each stage is the run's
configuration with its overrides applied (the overrides do not carry over to
later stages), and:

* writes to ``OUTPUT_DIR/stage-N`` (``trainer.output_dir`` is the run's);
* from the second stage on, starts from the previous stage's ``final/``
  checkpoint (``model.base``): its embedders, projector, language model and
  any LoRA adapters.

``umbrella train --recipe two-stage`` names a shipped list (:data:`RECIPES`).
Every stage's configuration is checked before the first one trains. With
``trainer.resume: auto`` a stage whose checkpoint and metrics are already
written is not run again, so a preempted job picks up where it stopped.

A model composed from a language model (``model.language``) with
``model.trainable: auto`` and no ``stages`` runs LLaVA's two stages
(:func:`default_stages`): a frozen base language model never learned to end a
turn of a chat template, and a projector alone cannot teach it. Once every
stage is done, ``OUTPUT_DIR/final`` is the last stage's ``final/``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs

from umbrella_core.config import RunConfig, learning_rate, structure
from umbrella_core.errors import ConfigError

__all__ = [
    "RECIPES",
    "STAGE_ONE_SHARE",
    "default_stages",
    "recipe_stages",
    "run",
    "run_stages",
    "stage_configs",
]

RECIPES: dict[str, tuple[dict[str, Any], ...]] = {
    # LLaVA's recipe: align the image tokens to a frozen language model first,
    # then adapt the language model too (with LoRA, embedders and projector).
    "two-stage": (
        {"model.trainable": "projector"},
        {"model.trainable": "lora"},
    ),
}

#: The share of a composed model's steps (or epochs) that stage 1 takes: it only
#: aligns the new image path to the frozen language model, which stage 2 goes on
#: training beside the adapters.
STAGE_ONE_SHARE = 0.25

# Set by the recipe for every stage; a stage that sets them is an error.
_RESERVED = ("trainer.output_dir", "stages")


def recipe_stages(name: str) -> tuple[dict[str, Any], ...]:
    """The stages of the shipped recipe ``name``."""
    try:
        return RECIPES[name]
    except KeyError:
        raise ConfigError(
            f"recipe {name!r}: unknown; shipped recipes: {', '.join(sorted(RECIPES))}"
        ) from None


def default_stages(config: RunConfig) -> RunConfig:
    """``config`` with LLaVA's two stages where it composes a model and chooses nothing.

    That is ``model.language`` set, ``model.trainable: auto`` and no ``stages``:
    stage 1 trains the patch embedders, the projector and a fresh vision body on
    :data:`STAGE_ONE_SHARE` of the steps (or epochs); stage 2 adds LoRA adapters on
    the language model for the rest. Any other configuration is returned as it is.
    """
    if config.stages or not config.model.language or config.model.trainable != "auto":
        return config
    t = config.trainer
    if t.max_steps == 1:
        raise ConfigError(
            "trainer.max_steps: a model composed from a language model trains in two stages "
            "(model.trainable: auto), which needs at least 2 steps; or set model.trainable"
        )
    length: tuple[dict[str, float], dict[str, float]]
    if t.max_steps:
        first = max(1, round(t.max_steps * STAGE_ONE_SHARE))
        length = ({"trainer.max_steps": first}, {"trainer.max_steps": t.max_steps - first})
    else:
        first_epochs = t.epochs * STAGE_ONE_SHARE
        length = ({"trainer.epochs": first_epochs}, {"trainer.epochs": t.epochs - first_epochs})
    stages = tuple(
        {"model.trainable": trainable, **steps}
        for trainable, steps in zip(("projector", "lora"), length, strict=True)
    )
    return attrs.evolve(config, stages=stages)


def run(config: RunConfig, pm: Any, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """``umbrella train``: one run, or its stages (given, or :func:`default_stages`)."""
    from umbrella_core.train.run import train

    staged = default_stages(config)
    if not staged.stages:
        return train(config, pm, log=log)
    if staged is not config:
        log(
            "model.language with model.trainable auto: LLaVA's two stages, so that the "
            "language model learns to answer in its chat template (set model.trainable or "
            "--recipe for another plan)"
        )
    return run_stages(staged, pm, log=log)


def _described(stage: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in _leaves(stage, "").items()) or "no overrides"


def _leaves(value: Mapping[str, Any], key: str, prefix: str = "") -> dict[str, Any]:
    """Nested or dotted overrides as ``{dotted.key: value}`` (non-empty mappings merge)."""
    flat: dict[str, Any] = {}
    for name, item in value.items():
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{key}: expected setting names, got {name!r}")
        dotted = f"{prefix}{name}"
        if isinstance(item, Mapping) and item:
            flat.update(_leaves(item, key, f"{dotted}."))
        else:
            flat[dotted] = item
    return flat


def _set(data: dict[str, Any], dotted: str, value: Any, key: str) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: {dotted}: {part} is not a section")
    node[parts[-1]] = value


def stage_configs(config: RunConfig) -> list[RunConfig]:
    """The configuration of each stage of ``config.stages``, all checked up front."""
    out_dir = Path(config.trainer.output_dir).expanduser()
    base = config.to_dict()
    base["stages"] = []
    # Left to choose, the rate is the run's: a later stage starts from a checkpoint,
    # which would choose the pretrained rate for a tiny model's run.
    run_rate = learning_rate(config)[0]
    configs: list[RunConfig] = []
    for index, stage in enumerate(config.stages):
        key = f"stages[{index}]"
        if not isinstance(stage, Mapping):
            raise ConfigError(f"{key}: expected a mapping of overrides, got {stage!r}")
        overrides = _leaves(stage, key)
        for dotted in overrides:
            if dotted in _RESERVED or dotted.startswith("stages."):
                raise ConfigError(
                    f"{key}: {dotted} is set by the recipe (each stage writes OUTPUT_DIR/stage-N)"
                )
            if dotted == "model.base" and index > 0:
                raise ConfigError(
                    f"{key}: model.base of a later stage is the previous stage's checkpoint"
                )
        data = json.loads(json.dumps(base))  # a deep copy of plain values
        for dotted, value in overrides.items():
            _set(data, dotted, value, key)
        data["trainer"]["output_dir"] = str(out_dir / f"stage-{index + 1}")
        if index > 0:
            data["model"]["base"] = str(out_dir / f"stage-{index}" / "final")
            # Composed once, in stage 1; later stages go on from its weights.
            data["model"]["language"] = ""
        try:
            staged = structure(RunConfig, data)
        except ConfigError as exc:
            raise ConfigError(f"{key}: {exc}") from None
        if learning_rate(staged)[0] != run_rate and "trainer.learning_rate" not in overrides:
            staged = attrs.evolve(
                staged, trainer=attrs.evolve(staged.trainer, learning_rate=run_rate)
            )
        configs.append(staged)
    return configs


def _main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _barrier() -> None:
    """Every rank waits until the main one has written the stage's checkpoint."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def run_stages(config: RunConfig, pm: Any, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train every stage of ``config.stages`` in turn.

    Returns the last stage's metrics with ``stages``: each stage's overrides,
    output folder and metrics (also written to ``OUTPUT_DIR/stages.json``).
    """
    from umbrella_core.model.build import is_checkpoint
    from umbrella_core.train.run import train

    configs = stage_configs(config)
    out_dir = Path(config.trainer.output_dir).expanduser().resolve()
    log(f"{len(configs)} stages, each from the previous one's final/:")
    for number, stage in enumerate(config.stages, 1):
        log(f"  stage {number}: {_described(stage)}")
    done: list[dict[str, Any]] = []
    for number, (stage, stage_config) in enumerate(zip(config.stages, configs, strict=True), 1):
        stage_dir = Path(stage_config.trainer.output_dir).expanduser().resolve()
        metrics_file = stage_dir / "metrics.json"
        described = _described(stage)
        if (
            stage_config.trainer.resume == "auto"
            and is_checkpoint(stage_dir / "final")
            and metrics_file.is_file()
        ):
            log(f"stage {number}/{len(configs)} ({described}): done before, {stage_dir}/final")
            metrics = json.loads(metrics_file.read_text())
        else:
            log(f"stage {number}/{len(configs)} ({described}) -> {stage_dir}")
            metrics = train(stage_config, pm, log=log)
            _barrier()
        done.append(
            {"stage": number, "overrides": dict(stage), "output_dir": str(stage_dir), **metrics}
        )
        last = metrics
    if _main_process():
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "stages.json").write_text(json.dumps(done, indent=2, default=str) + "\n")
        _link_final(out_dir, Path(done[-1]["output_dir"]) / "final", log)
    return {**last, "stages": done}


def _link_final(out_dir: Path, last: Path, log: Callable[[str], None]) -> None:
    """``OUTPUT_DIR/final``: the last stage's ``final/``, where a one-stage run keeps it."""
    from umbrella_core.model.build import is_checkpoint

    if not is_checkpoint(last):
        return
    link = out_dir / "final"
    if link.is_symlink() or not link.exists():
        tmp = out_dir / ".final.link"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(os.path.relpath(last, out_dir), target_is_directory=True)
        os.replace(tmp, link)
        log(f"final/:      {link} -> {last}")
