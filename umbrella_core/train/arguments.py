"""The transformers ``TrainingArguments`` of a run, and the settings they are made from.

One place for ``umbrella train``, the tests and the benchmarks: the trainer
section as arguments (:func:`training_arguments`), the checkpoint ``--resume``
names, the DeepSpeed config file, bfloat16 where the hardware has it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from umbrella_core.config import RunConfig, learning_rate
from umbrella_core.errors import ConfigError
from umbrella_core.train.trackers import check_trackers

__all__ = ["training_arguments", "resume_checkpoint", "deepspeed_config", "bf16_supported"]


def resume_checkpoint(setting: str, out_dir: Path) -> str | None:
    """The checkpoint ``trainer.resume`` names: ``auto`` is the latest in ``out_dir``.

    ``auto`` with no checkpoint yet starts fresh (a job script can always pass
    ``--resume``); a folder that is not a checkpoint is an error.
    """
    if not setting:
        return None
    if setting == "auto":
        from umbrella_core.train.faults import last_complete_checkpoint

        # Never a checkpoint a killed process was writing (train/faults.py).
        return last_complete_checkpoint(out_dir)
    folder = Path(setting).expanduser()
    if not (folder / "trainer_state.json").is_file():
        raise ConfigError(
            f"trainer.resume: {folder} is not a training checkpoint (no trainer_state.json); "
            "give a checkpoint-N folder of an earlier run, or auto"
        )
    return str(folder)


def deepspeed_config(setting: str) -> str | None:
    """The DeepSpeed JSON file for ``trainer.deepspeed``: ``zero2``, ``zero3`` or a path."""
    if not setting:
        return None
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(
            f"trainer.deepspeed={setting}: DeepSpeed is not installed; "
            "pip install 'umbrella-core[deepspeed]'"
        )
    shipped = Path(__file__).resolve().parent.parent / "configs" / f"deepspeed_{setting}.json"
    if setting in ("zero2", "zero3"):
        return str(shipped)
    path = Path(setting).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"trainer.deepspeed: {setting!r} is neither zero2, zero3 nor a DeepSpeed JSON file"
        )
    return str(path)


def training_arguments(config: RunConfig, out_dir: Path) -> Any:
    """The transformers ``TrainingArguments`` of a run (one place for train, tests, benchmarks)."""
    import torch
    from transformers import TrainingArguments

    from umbrella_core.train.callbacks import evaluation_arguments

    t = config.trainer
    # A tracker that is not installed stops the run here, before any data is read.
    check_trackers(t.report_to)
    if t.deepspeed and not torch.cuda.is_available():
        _no_cpu_inference_kernels()
    args = TrainingArguments(
        output_dir=str(out_dir),
        max_steps=t.max_steps if t.max_steps > 0 else -1,
        num_train_epochs=t.epochs,
        per_device_train_batch_size=t.batch_size,
        learning_rate=learning_rate(config)[0],
        warmup_steps=int(math.ceil(t.warmup_ratio * max(t.max_steps, 1))) if t.max_steps > 0 else 0,
        weight_decay=t.weight_decay,
        adam_beta2=t.adam_beta2,
        lr_scheduler_type="cosine",
        logging_steps=t.logging_steps,
        # trainer.report_to's callbacks are added by train() (train/trackers.py),
        # writing where we say and told the run's configuration.
        report_to="none",
        save_strategy="steps" if t.save_steps > 0 else "no",
        save_steps=t.save_steps if t.save_steps > 0 else 500,
        save_total_limit=t.save_total_limit if t.save_total_limit > 0 else None,
        # Optimizer, scheduler and RNG states too, so --resume continues exactly
        # (transformers reads them back with torch.load(weights_only=True)).
        save_only_model=False,
        seed=t.seed,
        data_seed=t.seed,
        remove_unused_columns=False,
        dataloader_num_workers=config.data.workers,
        disable_tqdm=not t.progress,
        use_cpu=not torch.cuda.is_available(),
        label_names=["labels"],
        # Coverage (I4) runs every active embedder on every rank each step, so
        # DDP needs no search for unused parameters.
        ddp_find_unused_parameters=False,
        deepspeed=deepspeed_config(t.deepspeed),
        bf16=bf16_supported(t.bf16),
        # UmbrellaModel.activation_checkpointing_enable: the language model's layers.
        activation_checkpointing=t.gradient_checkpointing,
        # eval_strategy, eval_steps, metric_for_best_model (see train/callbacks.py).
        **evaluation_arguments(t),
    )
    if t.deepspeed and args.world_size > 1:
        # On CPU accelerate starts the process group but not DeepSpeed's view
        # of it, and ZeRO-3 partitions the model as it is built: start it here.
        from deepspeed import comm

        if not comm.is_initialized():
            comm.init_distributed(
                dist_backend="gloo" if args.use_cpu else "nccl", auto_mpi_discovery=False
            )
    return args


def _no_cpu_inference_kernels() -> None:
    """Keep DeepSpeed on CPU from compiling its shared-memory all-reduce kernels.

    DeepSpeed compiles them (about two minutes, once per machine) when its
    communication starts on CPU, but only ``inference_all_reduce`` uses them:
    training reduces through gloo. Best effort: another DeepSpeed version
    without this table just compiles them as before.
    """
    try:
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    except Exception:  # pragma: no cover - a DeepSpeed without the table
        return


def bf16_supported(wanted: bool) -> bool:
    """``trainer.bf16``, refused on a GPU without bfloat16 (CPUs autocast to bf16)."""
    import torch

    if wanted and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise ConfigError("trainer.bf16: this GPU has no bfloat16 support; set trainer.bf16=false")
    return wanted
