"""Padding benchmark: ``data.batching`` mixed, modality and length on a study of varied lengths.

The study is a BIDS dataset read by the umbrella-studies BIDS reader with its
default tasks: for every T1w scan and every dMRI (FA + MD) scan the sex, age
and diagnosis questions (one image each), and the two-subject
``sex_comparison`` (two images, so 64 more image tokens and a longer
question). Its images are tiny placeholder files: nothing here opens one, the
lengths come from the conversations and each modality's token count (I3),
and the training steps get random tensors of the demo geometry (t1 and dmri
32^3 with 8^3 patches: 64 tokens per image).

It measures, for each batching:

  (1) the padding fraction of one epoch: pad tokens over all tokens of the
      per-device batches, as the collator pads them (the project's
      ``InterleavedSampler`` order, cut as accelerate cuts it);
  (2) the median time of a training step of the built-in ``tiny`` model on
      CPU (``model.trainable=full``: forward, backward, AdamW), on the first
      batches of that epoch, the batchings taking turns step by step so that
      the machine's noise falls on all of them alike (warm-up steps excluded);
  (3) how long counting the lengths takes (``conversation_lengths``, what
      ``RecordDataset.lengths`` runs once at start-up) for 100,000 records:
      a cohort's templated conversations (few distinct ones) and 100,000
      distinct written conversations, against encoding each record fully.

Packing several samples into one sequence is not measured: UMBRELLA does not
pack (see benchmarks/README.md).

    python benchmarks/padding.py --out benchmarks/results/padding.md
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

BATCHINGS = ("mixed", "modality", "length")
MODALITIES = ("dmri", "t1")
WORDS = (
    "the scan shows a small lesion in the left right frontal temporal parietal lobe with "
    "mild moderate white matter changes and no mass effect ventricles are normal"
).split()


# -- the study ---------------------------------------------------------------------


def write_bids(root: Path, subjects: int, seed: int) -> Path:
    """A BIDS dataset: per subject a T1w and FA/MD maps, and a participants table."""
    import nibabel as nib
    import numpy as np

    rng = random.Random(seed)
    image = nib.Nifti1Image(np.zeros((4, 4, 4), dtype=np.float32), np.eye(4))
    root.mkdir(parents=True)
    (root / "dataset_description.json").write_text(
        json.dumps({"Name": "Padding", "BIDSVersion": "1.8.0"})
    )
    rows = ["participant_id\tage\tsex\tdx"]
    for i in range(subjects):
        sub = f"sub-{i:04d}"
        age = rng.randint(8, 80)
        rows.append(f"{sub}\t{age}\t{rng.choice('MF')}\t{rng.choice(['control', 'autism'])}")
        paths = [
            root / sub / "anat" / f"{sub}_T1w.nii.gz",
            root / "derivatives" / "dtifit" / sub / "dwi" / f"{sub}_desc-FA_dwimap.nii.gz",
            root / "derivatives" / "dtifit" / sub / "dwi" / f"{sub}_desc-MD_dwimap.nii.gz",
        ]
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            nib.save(image, str(path))
    (root / "participants.tsv").write_text("\n".join(rows) + "\n")
    return root


def prepare(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """The study's datasets and interleaving with lengths, and the tiny model."""
    import numpy as np

    from umbrella_core.config import load_config
    from umbrella_core.data.conversation import Tokenization
    from umbrella_core.data.dataset import RecordDataset, group_records
    from umbrella_core.data.interleave import Interleaving
    from umbrella_core.model.chat import chat_format
    from umbrella_core.model.start import start_model
    from umbrella_core.plugins import get_plugin_manager

    pm = get_plugin_manager()
    records = list(pm.read_study("bids:" + str(write_bids(folder, args.subjects, args.seed))))
    specs = {m: pm.resolve_modality(m).item.for_demo() for m in MODALITIES}
    config = load_config(None, [f"data.modalities={','.join(MODALITIES)}", "model.trainable=full"])
    started = start_model(config.model, specs, pm, seed=args.seed)
    chat = chat_format(started.tokenizer, config.model.chat_template, config.model.system_prompt)
    sets = [
        RecordDataset(
            group,
            specs,
            Tokenization.of(
                started.tokenizer,
                started.model.image_token_id,
                specs,
                config.model.max_length,
                chat,
            ),
            name=f"{study}/{key}",
            key=key,
        )
        for (study, key), group in group_records(records).items()
    ]
    lengths = np.concatenate([ds.lengths for ds in sets])
    interleaving = Interleaving(
        [len(ds) for ds in sets],
        keys=[ds.key for ds in sets],
        lengths=lengths,
    )
    return {
        "records": records,
        "specs": specs,
        "sets": sets,
        "interleaving": interleaving,
        "model": started.model,
        "tokenizer": started.tokenizer,
        "chat": chat,
    }


def orders(interleaving: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Each batching's order of epoch 0 (one process: the global batch is the device batch)."""
    from umbrella_core.data.interleave import InterleavedSampler

    return {
        b: InterleavedSampler(
            interleaving, seed=args.seed, global_batch=args.batch_size, batching=b
        ).order(0)
        for b in BATCHINGS
    }


def padding(order: Any, lengths: Any, batch: int) -> tuple[float, int, int]:
    """(pad fraction, pad tokens, all tokens) of ``order`` collated in batches of ``batch``."""
    pads = total = 0
    for start in range(0, len(order), batch):
        rows = lengths[order[start : start + batch]]
        pads += int((rows.max() - rows).sum())
        total += int(rows.max()) * len(rows)
    return pads / total, pads, total


# -- training steps ----------------------------------------------------------------


def batches(run: dict[str, Any], order: Any, args: argparse.Namespace) -> list[Any]:
    """The first collated batches of ``order``, with random images of the modality's shape."""
    import torch

    from umbrella_core.data.collate import UmbrellaCollator

    sets, offsets = run["sets"], run["interleaving"].offsets
    collator = UmbrellaCollator(run["tokenizer"].pad_token_id, tuple(sorted(run["specs"])))
    generator = torch.Generator().manual_seed(args.seed)
    out = []
    for step in range(args.warmup + args.steps):
        items = []
        for index in order[step * args.batch_size : (step + 1) * args.batch_size].tolist():
            source = int((offsets <= index).sum()) - 1
            ds = sets[source]
            record_index, _ = ds.items[index - int(offsets[source])]
            record = ds.record(record_index)
            encoded = ds.encode(record)
            images = [
                (m, torch.randn(run["specs"][m].input_shape, generator=generator))
                for m in record.modalities
            ]
            items.append(
                {
                    "input_ids": encoded.input_ids,
                    "labels": encoded.labels,
                    "images": images,
                    "key": record.modality_key,
                    "source": record.source,
                }
            )
        out.append(collator(items))
    return out


def step_times(run: dict[str, Any], order_of: dict[str, Any], args: argparse.Namespace) -> dict:
    """Median seconds per training step of each batching, the batchings taking turns."""
    import torch

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    model = run["model"]
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    prepared = {b: batches(run, order_of[b], args) for b in BATCHINGS}
    times: dict[str, list[float]] = {b: [] for b in BATCHINGS}
    for step in range(args.warmup + args.steps):
        turn = BATCHINGS[step % len(BATCHINGS) :] + BATCHINGS[: step % len(BATCHINGS)]
        for b in turn:
            batch = prepared[b][step]
            started = time.perf_counter()
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step >= args.warmup:
                times[b].append(time.perf_counter() - started)
    return {
        b: {
            "median_s": statistics.median(times[b]),
            "tokens_per_step": statistics.median(
                int(prepared[b][s]["input_ids"].numel()) for s in range(args.warmup, len(times[b]))
            ),
        }
        for b in BATCHINGS
    }


# -- counting lengths at 100k records ----------------------------------------------


def counting(run: dict[str, Any], args: argparse.Namespace) -> dict[str, float]:
    """Seconds to count 100,000 records' lengths, templated and distinct, and to encode them."""
    import attrs

    from umbrella_core.data.lengths import conversation_lengths
    from umbrella_core.types import Turn

    rng = random.Random(args.seed)
    base = run["records"]
    templated = [base[i % len(base)] for i in range(args.count_records)]
    distinct = []
    for i in range(args.count_records):
        record = base[i % len(base)]
        report = f"Report {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60)))
        turns = (record.turns[0], Turn(role="assistant", content=report))
        distinct.append(attrs.evolve(record, turns=turns))
    out = {}
    for name, records in (("templated", templated), ("distinct", distinct)):
        started = time.perf_counter()
        conversation_lengths(records, run["sets"][0].tokenization)
        out[name] = time.perf_counter() - started
    # A full encoding of each distinct conversation (what screening does), on a sample.
    sample = distinct[: args.encode_sample]
    ds = run["sets"][0]
    started = time.perf_counter()
    for record in sample:
        ds.encode(record)
    out["encode_distinct"] = (time.perf_counter() - started) * args.count_records / len(sample)
    return out


# -- report ------------------------------------------------------------------------


def report(run: dict[str, Any], args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    import numpy as np

    mix = run["interleaving"]
    lengths = mix.lengths
    order_of = orders(mix, args)
    pads = {b: padding(order_of[b], lengths, args.batch_size) for b in BATCHINGS}
    steps = step_times(run, order_of, args)
    counts = counting(run, args)
    comparisons = sum(len(r.images) == 2 for r in run["records"])
    lines = [
        "# Padding: `data.batching` mixed, modality, length",
        "",
        "    python benchmarks/padding.py --out benchmarks/results/padding.md"
        + (f"  # {args.note}" if args.note else ""),
        "",
        f"Study: BIDS reader, default tasks, {args.subjects} subjects with a T1w and FA/MD maps: "
        f"{len(run['records'])} samples ({comparisons} two-subject comparisons), "
        f"{len(run['sets'])} groups ({', '.join(ds.name.rsplit('/', 1)[-1] for ds in run['sets'])}"
        f"). Lengths {int(lengths.min())}-{int(lengths.max())} tokens, "
        f"median {int(np.median(lengths))}. Per-device batch {args.batch_size}, one process, "
        f"seed {args.seed}; tiny model on CPU, {args.threads} torch thread(s), "
        f"{args.steps} timed steps per batching after {args.warmup} warm-up steps.",
        "",
        "| batching | pad fraction (epoch) | pad tokens / all | tokens per step (median) "
        "| median step ms | step time vs mixed |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for b in BATCHINGS:
        fraction, pad, total = pads[b]
        lines.append(
            f"| {b} | {fraction:.1%} | {pad} / {total} | {steps[b]['tokens_per_step']:.0f} "
            f"| {steps[b]['median_s'] * 1e3:.1f} "
            f"| {steps[b]['median_s'] / steps['mixed']['median_s']:.2f}x |"
        )
    lines += [
        "",
        f"Pad tokens of `length` against `mixed`: {pads['length'][1] / pads['mixed'][1]:.4f}x "
        f"(against `modality`: {pads['length'][1] / pads['modality'][1]:.4f}x); all tokens "
        f"of the epoch, padding included: {pads['length'][2] / pads['mixed'][2]:.2f}x.",
        "",
        f"Counting the lengths of {args.count_records} records (`conversation_lengths`, "
        "the tiny model's byte-level tokenizer):",
        "",
        "| records | seconds |",
        "|---|---:|",
        f"| templated conversations (the BIDS reader's, repeated) | {counts['templated']:.2f} |",
        f"| distinct conversations (a written report each) | {counts['distinct']:.2f} |",
        f"| full `encode` of each distinct one (from {args.encode_sample}, scaled) "
        f"| {counts['encode_distinct']:.2f} |",
        "",
    ]
    data = {
        "padding": {b: pads[b][0] for b in BATCHINGS},
        "steps": steps,
        "counting_s": counts,
        "samples": len(run["records"]),
    }
    return "\n".join(lines), data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--subjects", type=int, default=240)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--count-records", type=int, default=100_000)
    parser.add_argument("--encode-sample", type=int, default=5_000)
    parser.add_argument("--note", default="")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = prepare(args, Path(tmp) / "bids")
        text, data = report(run, args)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    main()
