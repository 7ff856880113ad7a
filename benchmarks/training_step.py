"""Training-step benchmark: the framework's step against a hand-written PyTorch loop.

On the built-in ``tiny`` model (random weights, ``model.trainable=full``) with
the demo geometry (``spec.for_demo()``: t1 and dmri 32^3 with 8^3 patches, fmri
24^3 x 8 frames with 8^3 x 4 patches) and batches of demo phantom data,
collated once by the project's collator (one modality per batch), it measures:

  (1) the framework's training step, as ``UmbrellaTrainer.train()`` runs it
      (``training_step``, gradient clipping, AdamW, LR scheduler, callbacks),
      timed per step by a TrainerCallback, against a plain loop
      (``model(**batch).loss.backward(); optimizer.step(); optimizer.zero_grad()``)
      on an identical copy of the model, the same batch, the same optimizer
      (class and arguments from the Trainer's own ``get_optimizer_cls_and_kwargs``)
      and the same trainable parameters. A plain loop with ``clip_grad_norm_``
      (the Trainer clips at ``max_grad_norm=1.0`` by default) separates the cost
      of clipping from the rest of the Trainer;
  (2) what coverage costs: the plain step with coverage (absent modalities embed
      one zero image, scaled by exactly 0.0) against the same step on a copy
      whose absent embedders are skipped (a benchmark-only subclass); and,
      less exposed to noise, the work coverage adds (the model's
      ``image_features`` for the absent modalities only, forward and backward,
      and AdamW on their embedders) timed by itself, as a share of the step;
  (3) samples per second per modality, and peak resident memory of the Trainer
      running batches of one modality, each modality in a fresh process (the
      peak of training alone: VmHWM reset before ``train()``; and the process's
      ``getrusage`` peak).

The variants run interleaved on every step (the Trainer's step, then the plain
variants in rotating order), warm-up steps excluded; the tables give medians
and ratios from one run. A short cProfile of extra Trainer steps shows where
the time goes.

With ``--language DIR`` the model is composed from that causal language model
instead (as ``umbrella train --language DIR`` composes it: patch embedders, a
fresh vision body and a new projector in front of the pretrained LM), and
``--trainable`` defaults to ``projector`` (stage 1 of a composed model's
recipe; ``lora`` is stage 2): the framework's per-step overhead on a real
model, e.g. Gemma 3 270M with its 262,144-token vocabulary (the plain loop
calls the same ``model(**batch).loss``, so both compute logits only where
labels are learned). ``benchmarks/real_lms.py`` makes real LMs available as
such folders.

    python benchmarks/training_step.py --out benchmarks/results/training_step.md
    python benchmarks/training_step.py --language "$(python benchmarks/real_lms.py \
        --models gemma3-270m --paths)" --out benchmarks/results/training_step_gemma3.md
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import cProfile
import io
import json
import os
import pstats
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MODALITIES = ("dmri", "fmri", "t1")


# -- setup ---------------------------------------------------------------------


def prepare_run(args: argparse.Namespace) -> tuple[Any, dict[str, dict[str, Any]]]:
    """The project's ``prepare`` on the demo, and one collated batch per modality."""
    from umbrella_core.config import load_config
    from umbrella_core.data.collate import UmbrellaCollator
    from umbrella_core.plugins import get_plugin_manager
    from umbrella_core.train.run import prepare

    overrides = [
        f"data.modalities={','.join(MODALITIES)}",
        f"data.demo_subjects={args.subjects}",
        f"model.trainable={args.trainable}",
        f"trainer.batch_size={args.batch_size}",
        "trainer.progress=false",
    ]
    if args.language:  # composed as `umbrella train --language DIR` composes it
        overrides.append(f"model.language={args.language}")
    config = load_config(None, overrides)
    prep = prepare(config, get_plugin_manager(), log=lambda _: None)
    collator = UmbrellaCollator(prep.tokenizer.pad_token_id, tuple(prep.specs))
    batches = {}
    for ds in prep.train_sets:
        batch = collator([ds[i % len(ds)] for i in range(args.batch_size)])
        (modality,) = batch["pixel_values"]
        batches[modality] = batch
    return prep, batches


def training_arguments(prep: Any, out_dir: str, max_steps: int) -> Any:
    """The run's own TrainingArguments (``umbrella_core.train.arguments.training_arguments``).

    Changed only where the benchmark needs it: each dataset item is a whole
    pre-collated batch (per-device batch 1), no checkpoints, evaluation,
    DataLoader workers or progress bar.
    """
    from pathlib import Path

    import attrs

    from umbrella_core.train.arguments import training_arguments as run_arguments

    config = prep.config
    trainer = attrs.evolve(
        config.trainer,
        max_steps=max_steps,
        batch_size=1,
        save_steps=0,
        eval_strategy="no",
        progress=False,
    )
    config = attrs.evolve(config, trainer=trainer, data=attrs.evolve(config.data, workers=0))
    return run_arguments(config, Path(out_dir))


def make_trainer(prep: Any, batches: list[dict[str, Any]], out_dir: str, max_steps: int) -> Any:
    """An UmbrellaTrainer whose dataset items are pre-collated batches.

    The project's interleaved sampler orders them; the collator hands each one
    through unchanged, so the Trainer trains on exactly the batches the plain
    loop gets. TensorBoard is attached as ``umbrella train`` attaches it.
    """
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback
    from transformers.utils import logging as hf_logging

    from umbrella_core.data.interleave import Interleaving
    from umbrella_core.train.trainer import UmbrellaTrainer

    class RecordingTrainer(UmbrellaTrainer):
        """UmbrellaTrainer that remembers the batch of the current step (for the plain variants)."""

        def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> Any:
            self.current_inputs = inputs
            return super().training_step(model, inputs, num_items_in_batch)

    hf_logging.set_verbosity_error()
    return RecordingTrainer(
        model=prep.model,
        args=training_arguments(prep, out_dir, max_steps),
        train_dataset=batches,
        data_collator=lambda items: items[0],
        processing_class=prep.tokenizer,
        interleaving=Interleaving([len(batches)]),
        provenance=prep.provenance,
        run_meta={},
        callbacks=[TensorBoardCallback(tb_writer=SummaryWriter(str(Path(out_dir) / "tb")))],
    )


def without_coverage(model: Any) -> Any:
    """A copy of ``model`` that runs only the embedders of modalities present in the batch.

    Benchmark only: the model's ``modalities`` shrinks to the batch's, so
    ``image_features`` skips the zero images of absent modalities (and their
    parameters get no gradient at all, so AdamW skips them too).
    """
    base = type(model)

    class WithoutCoverage(base):  # type: ignore[misc, valid-type]
        @property
        def modalities(self) -> tuple[str, ...]:
            order = base.modalities.fget(self)
            present = getattr(self, "_present", None)
            return order if present is None else tuple(m for m in order if m in present)

        def forward(self, *args: Any, pixel_values: Any = None, **kwargs: Any) -> Any:
            self._present = frozenset(pixel_values or ())
            try:
                return super().forward(*args, pixel_values=pixel_values, **kwargs)
            finally:
                self._present = None

    clone = copy.deepcopy(model)
    clone.__class__ = WithoutCoverage
    return clone


def embedder_calls(model: Any, batch: dict[str, Any]) -> list[str]:
    """Which embedders run for ``batch`` (to check that the variants differ as claimed)."""
    calls: list[str] = []
    handles = [
        module.register_forward_pre_hook(lambda *_, n=name: calls.append(n))
        for name, module in model.embeddings.embedders.items()
    ]
    try:
        model(**batch).loss.backward()
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
    return calls


def coverage_work(model: Any, opt_cls: Any, opt_kwargs: dict, repeats: int) -> dict[str, dict]:
    """Time the extra work coverage adds to a batch of one modality, by itself.

    For a batch of modality X: the model's own ``image_features`` restricted to
    the absent modalities (each embeds one zero image, and whatever else core
    does for an absent modality, e.g. the shared vision body), the backward of
    its 0.0 term, dropping those exact-zero gradients as the Trainer does, and
    an AdamW call over the absent embedders' parameters (which it then skips).
    A separate optimizer call carries its own fixed cost, so this slightly
    overstates the optimizer part.
    """
    from umbrella_core.train.trainer import drop_absent_embedder_gradients

    model = without_coverage(model)
    embeddings = model.embeddings
    out = {}
    for present in embeddings.order:
        absent = [m for m in embeddings.order if m != present]
        params = [p for m in absent for p in embeddings.embedders[m].parameters()]
        opt = opt_cls(params, **opt_kwargs)
        embed, step = [], []
        model._present = frozenset(absent)
        for _ in range(repeats):
            start = time.perf_counter()
            _, term = model.image_features({})
            term.backward()
            drop_absent_embedder_gradients(model)
            middle = time.perf_counter()
            opt.step()
            model.zero_grad(set_to_none=True)
            end = time.perf_counter()
            embed.append(middle - start)
            step.append(end - middle)
        model._present = None
        out[present] = {
            "absent": absent,
            "embed": statistics.median(embed),
            "optimizer": statistics.median(step),
        }
    return out


# -- the measured run ------------------------------------------------------------


def plain_step(
    model: Any, optimizer: Any, batch: dict[str, Any], clip: float | None
) -> list[float]:
    """One hand-written step; returns the times of forward, backward, optimizer, zero_grad."""
    import torch

    from umbrella_core.train.trainer import drop_absent_embedder_gradients

    t0 = time.perf_counter()
    loss = model(**batch).loss
    t1 = time.perf_counter()
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    # As the Trainer does (AbsentEmbeddersStayPut): the optimizer skips them.
    drop_absent_embedder_gradients(model)
    t2 = time.perf_counter()
    optimizer.step()
    t3 = time.perf_counter()
    optimizer.zero_grad()
    t4 = time.perf_counter()
    return [t1 - t0, t2 - t1, t3 - t2, t4 - t3]


def measure(args: argparse.Namespace, prep: Any, batches: dict[str, dict[str, Any]]) -> dict:
    from transformers import Trainer, TrainerCallback

    trainer_model = prep.model
    plain = copy.deepcopy(trainer_model)
    clipped = copy.deepcopy(trainer_model)
    uncovered = without_coverage(trainer_model)
    calls = {
        m: {"coverage": embedder_calls(plain, b), "no coverage": embedder_calls(uncovered, b)}
        for m, b in batches.items()
    }
    for m, c in calls.items():  # (2) is void unless the variants differ as intended
        if sorted(c["coverage"]) != sorted(MODALITIES) or c["no coverage"] != [m]:
            raise SystemExit(f"unexpected embedder calls for a {m} batch: {c}")
    with tempfile.TemporaryDirectory() as out_dir:
        max_steps = args.warmup + args.steps + args.profile_steps
        trainer = make_trainer(prep, list(batches.values()), out_dir, max_steps)
        opt_cls, opt_kwargs = Trainer.get_optimizer_cls_and_kwargs(trainer.args)
        opt_kwargs = {**opt_kwargs, "weight_decay": trainer.args.weight_decay}

        def optimizer(model: Any) -> Any:
            return opt_cls([p for p in model.parameters() if p.requires_grad], **opt_kwargs)

        work = coverage_work(trainer_model, opt_cls, opt_kwargs, args.coverage_repeats)
        variants = {
            "plain": (plain, optimizer(plain), None),
            "plain+clip": (clipped, optimizer(clipped), trainer.args.max_grad_norm),
            "no coverage": (uncovered, optimizer(uncovered), None),
        }
        steps: list[dict[str, Any]] = []  # one record per measured step
        profile = cProfile.Profile()

        class Timer(TrainerCallback):
            step = 0
            begin = resume = between = None

            def on_step_begin(self, *_: Any, **__: Any) -> None:
                self.begin = time.perf_counter()
                self.between = None if self.resume is None else self.begin - self.resume
                if self.step >= args.warmup + args.steps:
                    profile.enable()

            def on_step_end(self, *_: Any, **__: Any) -> None:
                elapsed = time.perf_counter() - self.begin
                profile.disable()
                batch = trainer.current_inputs
                (modality,) = batch["pixel_values"]
                self.step += 1
                if self.step <= args.warmup + args.steps:
                    record = {"modality": modality, "trainer": elapsed, "between": self.between}
                    names = list(variants)
                    shift = self.step % len(names)  # rotate the order: no variant always first
                    for name in names[shift:] + names[:shift]:
                        model, opt, clip = variants[name]
                        start = time.perf_counter()
                        split = plain_step(model, opt, batch, clip)
                        record[name] = time.perf_counter() - start
                        if name == "plain":
                            record["phases"] = split
                    if self.step > args.warmup and self.between is not None:
                        steps.append(record)
                self.resume = time.perf_counter()

        trainer.add_callback(Timer())
        trainer.train()
    stream = io.StringIO()
    pstats.Stats(profile, stream=stream).sort_stats("tottime").print_stats(args.profile_top)
    return {
        "steps": steps,
        "profile": stream.getvalue(),
        "trainable": sum(p.numel() for p in trainer_model.parameters() if p.requires_grad),
        "total": sum(p.numel() for p in trainer_model.parameters()),
        "optimizer": f"{opt_cls.__module__}.{opt_cls.__qualname__}({opt_kwargs})",
        "calls": calls,
        "coverage_work": work,
    }


def memory_child(args: argparse.Namespace) -> None:
    """In a fresh process: peak RSS of the Trainer on batches of one modality.

    Two figures: the peak of the whole ``train()`` (first-step allocations
    included), and the steady state, from a step boundary after the warm-up
    steps: the peak of the later steps above the RSS at that boundary (the
    memory one step takes and gives back: activations, gradients).
    """
    import torch
    from transformers import TrainerCallback

    torch.set_num_threads(args.threads)
    prep, batches = prepare_run(args)
    batch = batches[args.child_memory]
    marks: dict[str, int] = {}

    class Steady(TrainerCallback):
        def on_step_begin(self, _args: Any, state: Any, *_: Any, **__: Any) -> None:
            if state.global_step == args.warmup:
                marks["warmup_peak"] = status_kib("VmHWM") * 1024
                marks["rss_steady"] = status_kib("VmRSS") * 1024
                reset_peak()

    with tempfile.TemporaryDirectory() as out_dir:
        trainer = make_trainer(prep, [batch], out_dir, args.warmup + args.memory_steps)
        trainer.add_callback(Steady())
        rss_start = status_kib("VmRSS") * 1024
        reset = reset_peak()
        start = time.perf_counter()
        trainer.train()
        elapsed = time.perf_counter() - start
    process_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    steady_peak = status_kib("VmHWM") * 1024
    print(
        json.dumps(
            {
                "rss_start": rss_start,
                "peak": max(marks["warmup_peak"], steady_peak) if reset else process_peak,
                "rss_steady": marks["rss_steady"],
                "steady_peak": steady_peak if reset else None,
                "process_peak": process_peak,
                "seconds": elapsed,
            }
        )
    )


def status_kib(field: str) -> int:
    """A ``kB`` field of /proc/self/status (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM), so the peak is that of training alone."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def memory(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    out = {}
    for modality in MODALITIES:
        command = [
            sys.executable,
            __file__,
            "--child-memory",
            modality,
            "--batch-size",
            str(args.batch_size),
            "--subjects",
            str(args.subjects),
            "--threads",
            str(args.threads),
            "--trainable",
            args.trainable,
            "--memory-steps",
            str(args.memory_steps),
            "--warmup",
            str(args.warmup),
        ]
        if args.language:
            command += ["--language", args.language]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise SystemExit(f"memory run for {modality} failed:\n{result.stderr}")
        out[modality] = json.loads(result.stdout.strip().splitlines()[-1])
    return out


# -- report ------------------------------------------------------------------------


def derived(step: dict[str, Any]) -> dict[str, float]:
    """Per-step quantities: times (s) and ratios of variants measured on the same batch."""
    cycle = step["trainer"] + step["between"]
    return {
        "plain": step["plain"],
        "plain+clip": step["plain+clip"],
        "trainer": step["trainer"],
        "trainer+between": cycle,
        "between": step["between"],
        "no coverage": step["no coverage"],
        "overhead step": step["trainer"] / step["plain"] - 1,
        "overhead cycle": cycle / step["plain"] - 1,
        "coverage cost": step["plain"] / step["no coverage"] - 1,
    }


def report(args: argparse.Namespace, result: dict, mem: dict | None) -> tuple[str, dict]:
    rows = [*MODALITIES, "all"]
    unmeasured = sorted(set(MODALITIES) - {s["modality"] for s in result["steps"]})
    if unmeasured:
        raise SystemExit(
            f"no measured step of {', '.join(unmeasured)}: the sampler did not reach every "
            f"modality in {args.steps} steps; raise --steps (6 did in a smoke run)"
        )
    per_row = {
        m: [derived(s) for s in result["steps"] if m in ("all", s["modality"])] for m in rows
    }

    def med(name: str, m: str) -> float:
        return statistics.median(d[name] for d in per_row[m])

    def ms(name: str, m: str) -> str:
        return f"{med(name, m) * 1000:.1f}"

    def spread(name: str, m: str) -> float:
        """Rough 95 % half-width of a median (normal approximation, sigma from the IQR)."""
        values = [d[name] for d in per_row[m]]
        if len(values) < 2:  # a smoke run's few steps: no spread to speak of
            return float("nan")
        q1, _, q3 = statistics.quantiles(values, n=4)
        return 1.96 * 1.2533 * (q3 - q1) / 1.349 / len(values) ** 0.5

    def pct(name: str, m: str) -> str:
        return f"{med(name, m):+.1%} ± {spread(name, m):.1%}"

    names = list(per_row["all"][0])
    summary: dict[str, Any] = {"settings": {k: v for k, v in vars(args).items() if k != "out"}}
    summary["medians"] = {m: {n: round(med(n, m), 6) for n in names} for m in rows}
    summary["note"] = "times in seconds; ratios are medians of per-step paired ratios"
    n_steps = len(per_row["all"])
    model = (
        f"model composed from {args.language} (pretrained language model, fresh vision body "
        "and projector)"
        if args.language
        else "tiny model (random weights)"
    )
    lines = [
        f"{model}, demo geometry, trainable={args.trainable} "
        f"({result['trainable']:,} of {result['total']:,} parameters), batch {args.batch_size}, "
        f"{args.threads} torch thread(s); {n_steps} measured steps "
        f"({n_steps // len(MODALITIES)} per modality) after {args.warmup} warm-up steps; "
        f"optimizer {result['optimizer']}. Times are medians; ratios are medians of the "
        "per-step ratios of two variants run on the same batch in the same step, ± a rough 95 % "
        "interval of that median (from the spread of the per-step ratios).",
        "",
        "### (1) Framework step against a plain PyTorch loop (median ms per step)",
        "",
        "| batch | plain loop | plain + clip | Trainer step | Trainer step + between steps "
        "| overhead (step) | overhead (step + between) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for m in rows:
        lines.append(
            f"| {m} | {ms('plain', m)} | {ms('plain+clip', m)} | {ms('trainer', m)} | "
            f"{ms('trainer+between', m)} | {pct('overhead step', m)} | "
            f"{pct('overhead cycle', m)} |"
        )
    lines += [
        "",
        "'Trainer step' is on_step_begin to on_step_end (training_step, clip_grad_norm, "
        "optimizer and scheduler steps, zero_grad, callbacks); 'between steps' adds what the "
        "Trainer does from one step's end to the next one's begin (log/save/evaluate checks, "
        "fetching the batch through its DataLoader and the interleaved sampler): median "
        f"{med('between', 'all') * 1000:.2f} ms. Clipping gradients (the Trainer's default "
        f"max_grad_norm=1.0) costs {(med('plain+clip', 'all') - med('plain', 'all')) * 1000:+.2f} "
        "ms per step in the plain loop.",
        "",
        "### (2) What coverage costs (plain loop, batches of one modality; median ms per step)",
        "",
        "| batch | with coverage | without (absent embedders skipped) | cost, end to end "
        "| added work timed alone: forward + backward, AdamW (ms) | cost, added work alone |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    work = result["coverage_work"]
    direct = {}
    for m in MODALITIES:
        extra = work[m]["embed"] + work[m]["optimizer"]
        direct[m] = extra / med("no coverage", m)
    direct["all"] = statistics.mean(direct.values())
    for m in rows:
        alone = (
            f"{work[m]['embed'] * 1000:.2f} + {work[m]['optimizer'] * 1000:.2f}"
            if m in work
            else "(mean)"
        )
        lines.append(
            f"| {m} | {ms('plain', m)} | {ms('no coverage', m)} | {pct('coverage cost', m)} | "
            f"{alone} | {direct[m]:+.1%} |"
        )
    summary["coverage_work"] = work
    summary["coverage_cost_added_work"] = direct
    lines += [
        "",
        "The end-to-end cost compares whole steps; the added work is what coverage adds to a "
        f"batch of one modality, timed by itself ({args.coverage_repeats} repeats, median): the "
        "model's image_features for the absent modalities only (one zero image each through "
        "its embedder; under DeepSpeed, not measured here, its first token also goes through "
        "the shared vision body and projector) with the "
        "backward of its 0.0 term, then the exact-zero gradients dropped and an AdamW call "
        "that skips them (as the Trainer does: absent embedders do not move), divided by the "
        "step without coverage.",
        "",
        "Embedders run per step: "
        + "; ".join(
            f"{m} batch: {', '.join(c['coverage'])} with coverage, "
            f"{', '.join(c['no coverage'])} without"
            for m, c in result["calls"].items()
        )
        + ".",
        "",
        "### (3) Throughput and memory per modality",
        "",
        "| batch | Trainer samples/s | plain samples/s | peak RSS in train() MiB "
        "| RSS before train() MiB | steady-state step above RSS between steps MiB "
        "| process peak MiB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    mib = 2**20
    for m in MODALITIES:
        row = (
            f"| {m} | {args.batch_size / med('trainer+between', m):.1f} | "
            f"{args.batch_size / med('plain', m):.1f} |"
        )
        if mem:
            info = mem[m]
            row += (
                f" {info['peak'] / mib:.0f} | {info['rss_start'] / mib:.0f} | "
                + (
                    "n/a"
                    if info["steady_peak"] is None
                    else f"{(info['steady_peak'] - info['rss_steady']) / mib:.0f}"
                )
                + f" | {info['process_peak'] / mib:.0f} |"
            )
        else:
            row += " | | | |"
        lines.append(row)
    summary["memory"] = mem
    if mem:
        lines += [
            "",
            "Memory: each modality in a fresh process (prepare, then "
            f"{args.warmup} + {args.memory_steps} Trainer steps on that modality's batch). "
            "'Peak RSS in train()' is the kernel's peak-RSS mark (VmHWM), reset just before "
            "trainer.train() through /proc/self/clear_refs, so it holds the optimizer state and "
            "the first step's one-time allocations; the steady-state figure is the peak of the "
            f"steps after the first {args.warmup} (mark reset at that step boundary) above the RSS "
            "at that boundary: what one step takes and gives back. 'Process peak' is getrusage's "
            "ru_maxrss over the whole process (demo reading and model building included).",
        ]
    phases = ("forward", "backward", "optimizer.step", "zero_grad")
    lines += [
        "",
        "### Where a plain step's time goes (median ms)",
        "",
        "| batch | " + " | ".join(phases) + " |",
        "|---|" + "---:|" * len(phases),
    ]
    summary["phases"] = {}
    for m in MODALITIES:
        split = [s["phases"] for s in result["steps"] if s["modality"] == m]
        cols = [statistics.median(s[i] for s in split) for i in range(len(phases))]
        summary["phases"][m] = dict(zip(phases, (round(c, 6) for c in cols), strict=True))
        lines.append(f"| {m} | " + " | ".join(f"{c * 1000:.1f}" for c in cols) + " |")
    overhead, coverage = med("overhead cycle", "all"), med("coverage cost", "all")
    worst = max(MODALITIES, key=lambda m: med("coverage cost", m))
    fw_ok, cov_ok = overhead <= 0.10, coverage <= 0.03
    lines += [
        "",
        "### Targets",
        "",
        "| target | status |",
        "|---|---|",
        f"| median framework overhead <= 10 % | {'met' if fw_ok else 'NOT met'}: "
        f"{pct('overhead step', 'all')} (step), {pct('overhead cycle', 'all')} "
        "(step + between steps) |",
        f"| coverage <= 3 % of step time | {'met' if cov_ok else 'NOT met'} end to end: "
        f"{pct('coverage cost', 'all')} over all batches (largest per modality: {worst}, "
        f"{pct('coverage cost', worst)}); the added work timed alone: "
        f"{direct['all']:+.1%} (largest {max(direct[m] for m in MODALITIES):+.1%}) |",
        "",
        f"### cProfile of {args.profile_steps} further Trainer steps (top {args.profile_top} by "
        "own time)",
        "",
        "```",
        "\n".join(
            line.rstrip()
            for line in result["profile"].splitlines()
            if line.strip() and not line.lstrip().startswith(("Ordered by", "List reduced"))
        ),
        "```",
    ]
    summary["targets_met"] = {"framework_overhead": fw_ok, "coverage": cov_ok}
    summary["optimizer"] = result["optimizer"]
    summary["steps"] = result["steps"]
    return "\n".join(lines), summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="measured steps (all modalities)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--subjects", type=int, default=20, help="demo subjects per modality")
    parser.add_argument(
        "--language",
        help="compose the model from this causal language model folder (as umbrella train "
        "--language DIR) instead of the built-in tiny model",
    )
    parser.add_argument(
        "--trainable",
        choices=("embedders", "projector", "lora", "full"),
        help="model.trainable (default: full for the tiny model, projector with --language)",
    )
    parser.add_argument("--profile-steps", type=int, default=6)
    parser.add_argument("--profile-top", type=int, default=15)
    parser.add_argument("--memory-steps", type=int, default=6)
    parser.add_argument("--coverage-repeats", type=int, default=30)
    parser.add_argument("--no-memory", action="store_true", help="skip the memory processes")
    parser.add_argument("--out", type=Path, help="write the markdown here (and .json beside it)")
    parser.add_argument("--child-memory", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trainable is None:
        args.trainable = "projector" if args.language else "full"

    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with contextlib.ExitStack() as stack:
        if "UMBRELLA_CACHE" not in os.environ:  # the demo goes to a temporary cache
            os.environ["UMBRELLA_CACHE"] = stack.enter_context(tempfile.TemporaryDirectory())
        if args.child_memory:
            memory_child(args)
            return
        started = time.perf_counter()
        prep, batches = prepare_run(args)
        result = measure(args, prep, batches)
        mem = None if args.no_memory else memory(args)
        table, summary = report(args, result, mem)
        summary["wall_seconds"] = round(time.perf_counter() - started, 1)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n")
        args.out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
