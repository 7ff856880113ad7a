"""Does the demo learn on every machine? The quick start's run over seeds and thread counts.

``umbrella train --modalities t1,dmri`` (the built-in demo, every setting at
its default) for each ``trainer.seed`` in ``--seeds`` and each torch thread
count in ``--threads``. The seed changes the model's initial weights and the
order of the training samples; the thread count changes the order in which the
CPU kernels sum, as another machine's CPU does. Each run is a fresh process
that calls ``torch.set_num_threads(n)`` and then the ``umbrella`` command line,
with its own output folder and no progress bar; ``UMBRELLA_CACHE`` is shared,
so the demo data is written once (by a first, untimed ``umbrella demo`` write).

Prints (and with ``--out`` writes) a Markdown table of the held-out accuracy
(hemisphere) and MAE (the lesion centre's x coordinate, beside always answering
the training mean) per modality of each run's ``final/`` (``metrics.json``:
the ``test`` records; with ``trainer.load_best_at_end`` the weights of the best
evaluation on the ``validation`` records), the step of that evaluation and the wall time, then
the lowest accuracy per modality. Exit status 1 when any cell is below ``--min``.

    python benchmarks/demo_seeds.py --seeds 0-4 --threads 1,2 --out benchmarks/results/demo_seeds.md

``--jobs N`` runs N of them at a time (their wall times then include waiting
for each other; the accuracies do not change: each run's thread count is its own).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: What each run's process does: set the thread count, then be ``umbrella``.
CHILD = """
import sys, torch
torch.set_num_threads(int(sys.argv[1]))
from umbrella_core.commands import main
sys.exit(main(sys.argv[2:]))
"""


def numbers(text: str) -> list[int]:
    """``0-4`` or ``1,2`` (or both: ``0-2,7``) as a list of integers."""
    out: list[int] = []
    for part in text.split(","):
        low, _, high = part.partition("-")
        out.extend(range(int(low), int(high or low) + 1))
    return out


def run_demo(seed: int, threads: int, out_dir: Path, modalities: str, extra: list[str]) -> dict:
    """One demo run in a fresh process; its metrics.json, wall time and exit status."""
    log = out_dir.with_suffix(".log")
    command = [
        sys.executable, "-c", CHILD, str(threads),
        "train", "--modalities", modalities, "--output-dir", str(out_dir), "--no-progress",
        "--set", f"trainer.seed={seed}", *extra,
    ]  # fmt: skip
    started = time.perf_counter()
    with log.open("w") as stream:
        code = subprocess.call(command, stdout=stream, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - started
    metrics_file = out_dir / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if code == 0 and metrics_file.is_file() else {}
    return {"seed": seed, "threads": threads, "code": code, "seconds": seconds,
            "metrics": metrics, "log": str(log)}  # fmt: skip


def numeric(result: dict) -> tuple[float, float] | None:
    """(MAE, MAE of always answering the training mean) of a key's numeric question."""
    for question in result.get("questions", {}).values():
        metrics = question["metrics"]
        if question["family"] == "numeric" and metrics.get("mae") is not None:
            return metrics["mae"], metrics["reference"]["mae_train_mean"]
    return None


def table(results: list[dict], modalities: list[str]) -> str:
    """The Markdown table of the runs, then the lowest accuracy per modality.

    Per modality: the accuracy on the categorical question, then the MAE on
    the numeric one beside the MAE of always answering the training mean.
    """
    columns = [c for m in modalities for c in (f"{m} accuracy", f"{m} MAE (train mean)")]
    head = ["seed", "threads", *columns, "best step", "seconds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    lowest: dict[str, float] = {}
    worst: dict[str, float] = {}  # the largest MAE as a share of the training mean's
    for r in results:
        held_out = r["metrics"].get("held_out", {})
        cells = []
        for m in modalities:
            accuracy = held_out.get(m, {}).get("accuracy")
            if accuracy is None:
                cells += [f"failed (exit {r['code']}, {r['log']})", ""]
                lowest[m] = float("-inf")
                continue
            cells.append(f"{accuracy:.1%}")
            lowest[m] = min(lowest.get(m, 1.0), accuracy)
            errors = numeric(held_out[m])
            cells.append(f"{errors[0]:.2f} ({errors[1]:.2f})" if errors else "-")
            if errors:
                worst[m] = max(worst.get(m, 0.0), errors[0] / errors[1])
        final = r["metrics"].get("final", {})
        # final/ = best/ (trainer.load_best_at_end): the step of the best evaluation.
        if final.get("weights") == "best":
            weights = str(final["step"])
        else:
            weights = f"none: last weights, step {final.get('step', '?')}"
        row = [str(r["seed"]), str(r["threads"]), *cells, weights, f"{r['seconds']:.0f}"]
        lines.append("| " + " | ".join(row) + " |")
    low = [f"{lowest[m]:.1%}" if lowest[m] > float("-inf") else "failed" for m in modalities]
    high = [f"max {worst[m]:.0%} of the mean's" if m in worst else "" for m in modalities]
    summary = [f"**{v}** | **{h}**" for v, h in zip(low, high, strict=True)]
    lines.append("| **min** | | " + " | ".join(summary) + " | | |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0-4", help="trainer.seed values: 0-4 or 0,3")
    parser.add_argument("--threads", default="1,2", help="torch thread counts: 1,2")
    parser.add_argument("--modalities", default="t1,dmri")
    parser.add_argument("--workdir", help="where the runs go (default: a temporary folder)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time")
    parser.add_argument("--min", type=float, default=0.9, help="lowest acceptable accuracy")
    parser.add_argument("--out", help="also write the table to this Markdown file")
    parser.add_argument("--set", action="append", default=[], help="more section.key=value")
    args = parser.parse_args()

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="demo-seeds-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("UMBRELLA_CACHE", str(workdir / "cache"))
    # Threads that wait sleep rather than spin: with more runs than cores a
    # spinning thread takes the core from the one it waits for. (Where each
    # thread sums stays the same, so the results do too.)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    extra = [x for item in args.set for x in ("--set", item)]
    modalities = args.modalities.split(",")
    # Write the demo data once, before any timed run (runs read it from the cache).
    subprocess.check_call(
        [sys.executable, "-c", "from umbrella_core.commands import main; import sys; "
         "sys.exit(main(sys.argv[1:]))", "train", "--modalities", args.modalities,
         "--output-dir", str(workdir / "warm-up"), "--no-progress",
         "--set", "trainer.max_steps=1", "--set", "trainer.eval_strategy=no"],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    from concurrent.futures import ThreadPoolExecutor, as_completed

    cells = list(itertools.product(numbers(args.seeds), numbers(args.threads)))
    results = []
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        running = [
            pool.submit(run_demo, seed, threads, workdir / f"seed{seed}-threads{threads}",
                        args.modalities, extra)
            for seed, threads in cells
        ]  # fmt: skip
        for future in as_completed(running):
            result = future.result()
            results.append(result)
            held_out = result["metrics"].get("held_out", {})
            shown = ", ".join(f"{m} {held_out.get(m, {}).get('accuracy')}" for m in modalities)
            print(
                f"seed {result['seed']} threads {result['threads']}: {shown} "
                f"({result['seconds']:.0f} s)",
                flush=True,
            )
    results.sort(key=lambda r: (r["seed"], r["threads"]))
    text = table(results, modalities)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    accuracies = [
        r["metrics"].get("held_out", {}).get(m, {}).get("accuracy") for r in results
        for m in modalities
    ]  # fmt: skip
    return 0 if all(a is not None and a >= args.min for a in accuracies) else 1


if __name__ == "__main__":
    sys.exit(main())
