"""Does augmentation help a small cohort? The demo on few training subjects, with and without it.

The quick start's demo (``umbrella train --modalities t1,dmri``, every other
setting at its default) trained on ``--train`` subjects per modality instead
of 168, once with ``data.augment.<modality>: light`` for every modality and
once without, for each ``trainer.seed`` in ``--seeds``. The demo study is
written once with ``--subjects`` subjects per modality (70 % train, 10 %
validation, 20 % test); a manifest beside it keeps the records of the first
``--train`` training subjects of each modality and every validation and test
record, so both arms are scored on the same held-out subjects (48 per
modality at the default 240), more than a 40-subject demo's own split would hold.

Each run is a fresh process (``torch.set_num_threads(--threads)``, then the
``umbrella`` command line). Prints (and with ``--out`` writes) a Markdown
table: per run the held-out (``test``) accuracy on *which hemisphere holds the
lesion?* and the MAE on the lesion centre's x coordinate (beside always
answering the training mean) of ``final/`` (the best evaluation's weights on the
validation subjects), then the mean over seeds per arm.

    python benchmarks/augment_experiment.py --seeds 0-2 --train 40 --jobs 2 \\
        --out benchmarks/results/augment_experiment.md

The demo's coordinate question forbids spatial augmentation (its records'
``forbid_augment: [spatial]``: a shift moves the answer), so ``light`` moves
only the images of the hemisphere question and adds intensity changes to both.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from demo_seeds import numbers, numeric, run_demo  # noqa: E402


def subset(root: Path, train: int) -> Path:
    """A manifest beside the demo's keeping ``train`` training subjects per modality."""
    kept_subjects: dict[str, list[str]] = {}
    lines = []
    for line in (root / "manifest.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["split"] == "train":
            modality = record["images"][0]["modality"]
            chosen = kept_subjects.setdefault(modality, [])
            if record["subject"] not in chosen:
                if len(chosen) == train:
                    continue
                chosen.append(record["subject"])
        lines.append(line)
    short = [m for m, subjects in kept_subjects.items() if len(subjects) < train]
    if short:
        raise SystemExit(f"fewer than {train} training subjects for {', '.join(short)}")
    out = root / f"train{train}.jsonl"
    out.write_text("\n".join(lines) + "\n")
    return out


def table(results: list[dict], modalities: list[str]) -> str:
    columns = [c for m in modalities for c in (f"{m} accuracy", f"{m} MAE (train mean)")]
    head = ["augment", "seed", *columns, "best step", "seconds"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    sums: dict[tuple[str, str], list[float]] = {}
    for r in results:
        held_out = r["metrics"].get("held_out", {})
        cells = []
        for m in modalities:
            accuracy = held_out.get(m, {}).get("accuracy")
            if accuracy is None:
                cells += [f"failed (exit {r['code']}, {r['log']})", ""]
                continue
            errors = numeric(held_out[m])
            cells += [f"{accuracy:.1%}", f"{errors[0]:.2f} ({errors[1]:.2f})" if errors else "-"]
            sums.setdefault((r["arm"], m), []).append(accuracy)
            if errors:
                sums.setdefault((r["arm"], m + " mae"), []).append(errors[0])
        final = r["metrics"].get("final", {})
        step = str(final.get("step", "?")) + ("" if final.get("weights") == "best" else " (last)")
        row = [r["arm"], str(r["seed"]), *cells, step, f"{r['seconds']:.0f}"]
        lines.append("| " + " | ".join(row) + " |")
    for arm in dict.fromkeys(r["arm"] for r in results):
        cells = []
        for m in modalities:
            accuracies, maes = sums.get((arm, m), []), sums.get((arm, m + " mae"), [])
            cells.append(f"**{sum(accuracies) / len(accuracies):.1%}**" if accuracies else "-")
            cells.append(f"**{sum(maes) / len(maes):.2f}**" if maes else "-")
        lines.append(f"| **{arm}: mean** | | " + " | ".join(cells) + " | | |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0-2", help="trainer.seed values: 0-2 or 0,3")
    parser.add_argument("--train", type=int, default=40, help="training subjects per modality")
    parser.add_argument("--subjects", type=int, default=240, help="demo subjects per modality")
    parser.add_argument("--modalities", default="t1,dmri")
    parser.add_argument("--preset", default="light")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--workdir", help="where the runs go (default: a temporary folder)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time")
    parser.add_argument("--out", help="also write the table to this Markdown file")
    parser.add_argument("--set", action="append", default=[], help="more section.key=value")
    args = parser.parse_args()

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="augment-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("UMBRELLA_CACHE", str(workdir / "cache"))
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    modalities = args.modalities.split(",")
    root = workdir / "demo"
    if not (root / "manifest.jsonl").is_file():
        subprocess.check_call(
            [sys.executable, "-m", "umbrella_core.commands", "demo-data", str(root),
             "--modalities", args.modalities, "--subjects", str(args.subjects)],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
    manifest = subset(root, args.train)
    common = ["--study", str(manifest), "--config", str(root / "run.yaml")]
    common += [x for item in args.set for x in ("--set", item)]
    augmented = [x for m in modalities for x in ("--set", f"data.augment.{m}={args.preset}")]
    arms = {"none": common, args.preset: common + augmented}
    from concurrent.futures import ThreadPoolExecutor, as_completed

    results = []
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        running = {
            pool.submit(
                run_demo, seed, args.threads, workdir / f"{arm}-seed{seed}", args.modalities, extra
            ): arm
            for seed, (arm, extra) in itertools.product(numbers(args.seeds), arms.items())
        }
        for future in as_completed(running):
            result = future.result() | {"arm": running[future]}
            results.append(result)
            held_out = result["metrics"].get("held_out", {})
            shown = ", ".join(f"{m} {held_out.get(m, {}).get('accuracy')}" for m in modalities)
            print(f"{result['arm']} seed {result['seed']}: {shown} ({result['seconds']:.0f} s)")
    order = list(arms)
    results.sort(key=lambda r: (order.index(r["arm"]), r["seed"]))
    text = table(results, modalities)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0 if all(r["code"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
