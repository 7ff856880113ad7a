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
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from umbrella_core.config import RunConfig, structure
from umbrella_core.errors import ConfigError

__all__ = ["RECIPES", "recipe_stages", "stage_configs", "run_stages"]

RECIPES: dict[str, tuple[dict[str, Any], ...]] = {
    # LLaVA's recipe: align the image tokens to a frozen language model first,
    # then adapt the language model too (with LoRA, embedders and projector).
    "two-stage": (
        {"model.trainable": "projector"},
        {"model.trainable": "lora"},
    ),
}

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
    configs = []
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
            configs.append(structure(RunConfig, data))
        except ConfigError as exc:
            raise ConfigError(f"{key}: {exc}") from None
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
    done: list[dict[str, Any]] = []
    for number, (stage, stage_config) in enumerate(zip(config.stages, configs, strict=True), 1):
        stage_dir = Path(stage_config.trainer.output_dir).expanduser().resolve()
        metrics_file = stage_dir / "metrics.json"
        described = ", ".join(f"{k}={v}" for k, v in _leaves(stage, "").items()) or "no overrides"
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
    return {**last, "stages": done}
