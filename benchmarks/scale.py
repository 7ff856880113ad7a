"""How start-up and memory grow with the number of records: 1k to 200k.

A cohort is generated under ``--root``: a BIDS-like tree of ``N / 2``
subjects (``sub-XXXXXX/anat/sub-XXXXXX_T1w.nii.gz``), each a hard link to one
of a handful of real T1 files (nibabel's test data, gzipped), and a JSONL
manifest of ``N`` records, two questions per subject (age, sex), 20 % of the
subjects held out (``split`` given, as a cohort's table would). Hard links
give every subject its own path, so each header is read once per subject as
it would be in a real cohort, while the disk holds only the handful.

Each stage runs in a fresh process (peak RSS from ``getrusage``):

* ``read``: :func:`read_studies` (the manifest parsed, records built, split);
* ``check``: the default header check of training (``data.check: files``),
  first launch (no header index) and second launch (the index from the
  first); ``check_processes``: a first launch with ``data.workers: 2``;
* ``validate``: ``umbrella validate MANIFEST`` with the run's settings (it
  decodes every image), first and second launch;
* ``startup``: ``umbrella train`` until the end of its first optimizer step
  (tiny model, t1 at 32³), second launch;
* ``workers``: a DataLoader with 4 forked workers over the training records;
  each worker fetches a few real samples, then touches the records of its
  quarter of the epoch and runs a full garbage collection, as an epoch of a
  long run does, and the main process reads each worker's resident (RSS) and
  private (USS: pages the worker copied) memory from ``/proc``; with the
  records packed and frozen as ``umbrella train`` does with ``data.workers``
  (``workers``), and without (``workers_unpacked``), for comparison.

    python benchmarks/scale.py --records 1000 10000 100000 200000 \\
        --out benchmarks/results/scale.md
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

STAGES = (
    "read",
    "check",
    "check_processes",
    "validate",
    "startup",
    "workers",
    "workers_unpacked",
)
QUESTIONS = (
    ("<image>\nHow old is the participant, in years?", lambda i: f"{45 + i % 35} years"),
    ("<image>\nWhat is the participant's sex?", lambda i: "female" if i % 2 else "male"),
)


def real_t1_files(folder: Path) -> list[Path]:
    """The handful of real T1 files, gzipped as cohorts store them."""
    from nibabel.testing import data_path

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name in ("anatomical.nii", "standard.nii.gz"):
        source = Path(data_path) / name
        target = folder / (name if name.endswith(".gz") else name + ".gz")
        if not target.exists():
            if name.endswith(".gz"):
                shutil.copyfile(source, target)
            else:
                target.write_bytes(gzip.compress(source.read_bytes(), 6))
        out.append(target)
    return out


def _source(real: list[Path], i: int) -> Path:
    """The real file subject ``i`` links to: a copy per 30,000 links (ext4 allows 65,000)."""
    base = real[i % len(real)]
    copy = i // (30_000 * len(real))
    if not copy:
        return base
    target = base.with_name(f"{copy}-{base.name}")
    if not target.exists():
        shutil.copyfile(base, target)
    return target


def make_cohort(root: Path, records: int) -> Path:
    """The manifest of ``records`` records over ``records // 2`` linked T1 files."""
    cohort = root / f"cohort-{records}"
    manifest = cohort / "manifest.jsonl"
    if manifest.exists():
        return manifest
    real = real_t1_files(root / "real")
    subjects = records // len(QUESTIONS)
    lines = []
    for i in range(subjects):
        subject = f"sub-{i:06d}"
        anat = cohort / subject / "anat"
        anat.mkdir(parents=True, exist_ok=True)
        path = anat / f"{subject}_T1w.nii.gz"
        if not path.exists():
            os.link(_source(real, i), path)
        split = "test" if i % 5 == 0 else "train"
        for question, answer in QUESTIONS:
            lines.append(
                json.dumps(
                    {
                        "subject": subject,
                        "split": split,
                        "images": [
                            {"modality": "t1", "path": f"{subject}/anat/{subject}_T1w.nii.gz"}
                        ],
                        "conversation": [
                            {"role": "user", "content": question},
                            {"role": "assistant", "content": answer(i)},
                        ],
                        "phenotypes": {"age": 45 + i % 35, "sex": "F" if i % 2 else "M"},
                    }
                )
            )
    tmp = manifest.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(manifest)
    return manifest


def overrides(manifest: Path, cache: Path, out: Path) -> list[str]:
    return [
        "data.studies=" + json.dumps([str(manifest)]),
        "data.modalities=t1",
        "data.geometry.t1.shape=[32,32,32]",
        "data.geometry.t1.patch_size=[8,8,8]",
        f"data.cache_dir={cache}",
        f"data.header_index={cache.parent / 'headers'}",
        f"trainer.output_dir={out}",
    ]


def config_for(manifest: Path, cache: Path, out: Path) -> list[str]:
    return [arg for o in overrides(manifest, cache, out) for arg in ("--set", o)]


def _run_config(argv: list[str]):
    from umbrella_core.config import load_config

    return load_config(None, argv[1::2])


def stage_read(manifest: Path, cache: Path, out: Path) -> dict[str, float]:
    from umbrella_core.data.studies import read_studies
    from umbrella_core.plugins import get_plugin_manager

    config = _run_config(config_for(manifest, cache, out))
    started = time.perf_counter()
    data = read_studies(config, get_plugin_manager(), log=lambda _: None)
    return {"seconds": time.perf_counter() - started, "records": len(data.records)}


def stage_check_processes(manifest: Path, cache: Path, out: Path) -> dict[str, float]:
    """A first launch with ``data.workers: 2`` (header reads in 2 processes), fresh index."""
    index = cache.parent / "headers-processes"
    shutil.rmtree(index, ignore_errors=True)
    return stage_check(manifest, cache, out, extra=["data.workers=2", f"data.header_index={index}"])


def stage_check(
    manifest: Path, cache: Path, out: Path, extra: tuple[str, ...] | list[str] = ()
) -> dict[str, float]:
    from umbrella_core.data.conversation import Tokenization
    from umbrella_core.data.studies import read_studies, screen_records
    from umbrella_core.plugins import get_plugin_manager

    pm = get_plugin_manager()
    config = _run_config(
        [*config_for(manifest, cache, out), *(x for e in extra for x in ("--set", e))]
    )
    data = read_studies(config, pm, log=lambda _: None)
    encode = Tokenization.for_run(config.model, data.specs).encode
    started = time.perf_counter()
    kept, problems = screen_records(
        data.per_study,
        check="files",
        encode=encode,
        pm=pm,
        specs=data.specs,
        index=data.header_index,
        workers=config.data.workers,
    )
    data.header_index.save()
    assert not problems, problems[:3]
    return {"seconds": time.perf_counter() - started}


def stage_validate(manifest: Path, cache: Path, out: Path) -> dict[str, float]:
    env = dict(os.environ, UMBRELLA_CACHE=str(cache.parent))
    started = time.perf_counter()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "umbrella_core.commands",
            "validate",
            str(manifest),
            *config_for(manifest, cache, out)[2:],
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    seconds = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"umbrella validate failed:\n{done.stdout}\n{done.stderr}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"seconds": seconds, "child_peak_mb": peak}


def stage_startup(manifest: Path, cache: Path, out: Path) -> dict[str, float]:
    """Seconds from the start of this process to the end of the first optimizer step."""
    import transformers

    from umbrella_core.commands import main

    class FirstStep(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            result = {"seconds": time.perf_counter() - START, "peak_mb": peak}
            print(json.dumps(result), flush=True)
            os._exit(0)

    original = transformers.Trainer.__init__

    def init(self, *a, **kw):
        original(self, *a, **kw)
        self.add_callback(FirstStep())

    transformers.Trainer.__init__ = init
    argv = [
        "train",
        *config_for(manifest, cache, out),
        "--max-steps",
        "1",
        "--overwrite",
        "--no-progress",
        "--set",
        "trainer.eval_steps=0",
    ]
    main(argv)
    raise SystemExit("training ended without a step")


def stage_workers_unpacked(manifest: Path, cache: Path, out: Path) -> dict[str, float]:
    return stage_workers(manifest, cache, out, packed=False)


def stage_workers(
    manifest: Path, cache: Path, out: Path, *, packed: bool = True
) -> dict[str, float]:
    import gc

    from torch.utils.data import DataLoader

    from umbrella_core.data.collate import UmbrellaCollator
    from umbrella_core.data.packed import ready_for_workers
    from umbrella_core.plugins import get_plugin_manager
    from umbrella_core.train.run import _import_model_stack, prepare

    _import_model_stack()  # as `umbrella train` does before reading the studies
    config = _run_config(config_for(manifest, cache, out))
    prep = prepare(config, get_plugin_manager(), log=lambda _: None)
    dataset = prep.train_sets[0]
    if packed:
        # What `umbrella train` does before its workers start.
        ready_for_workers([*prep.train_sets, prep.eval_set])
    workers = 4
    share = len(dataset) // workers

    class Epoch:
        """A few real samples, then one epoch's worth of record reads and a full collection."""

        def __init__(self) -> None:
            self.touched = False

        def __len__(self) -> int:
            return workers * 2

        def __getitem__(self, index: int):
            import torch.utils.data

            item = dataset[index]
            if not self.touched:
                worker = torch.utils.data.get_worker_info().id
                for i in range(worker * share, (worker + 1) * share):
                    dataset.record(dataset.items[i][0])
                gc.collect()
                self.touched = True
            return item

    loader = DataLoader(
        Epoch(),
        batch_size=1,
        num_workers=workers,
        collate_fn=UmbrellaCollator(prep.tokenizer.pad_token_id, tuple(prep.specs)),
        persistent_workers=True,
        multiprocessing_context="fork",
    )
    it = iter(loader)
    for _ in range(workers * 2):
        next(it)
    pids = [w.pid for w in it._workers]
    rss, uss = [], []
    for pid in pids:
        fields = {}
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
            name, value = line.split(":", 1)
            fields[name] = int(value.split()[0]) / 1024
        rss.append(fields["Rss"])
        uss.append(fields["Private_Clean"] + fields["Private_Dirty"])
    del it, loader
    rss.sort()
    uss.sort()
    return {"worker_rss_mb": rss[len(rss) // 2], "worker_uss_mb": uss[len(uss) // 2]}


def run_stage(stage: str, manifest: Path, cache: Path, out: Path) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, __file__, "--stage", stage, str(manifest), str(cache), str(out)],
        capture_output=True,
        text=True,
    )
    if done.returncode:
        raise SystemExit(f"stage {stage} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(results: dict[int, dict[str, dict[str, float]]]) -> str:
    sizes = sorted(results)
    rows = [
        ("read the studies: s", "read", "seconds"),
        ("read the studies: peak MB", "read", "peak_mb"),
        ("header check, first launch: s", "check-first", "seconds"),
        ("header check, first launch, `data.workers: 2`: s", "check_processes", "seconds"),
        ("header check, second launch: s", "check-second", "seconds"),
        ("`umbrella validate`, first: s", "validate-first", "seconds"),
        ("`umbrella validate`, second: s", "validate-second", "seconds"),
        ("`umbrella validate`: peak MB", "validate-first", "child_peak_mb"),
        ("start-up to step 1, second launch: s", "startup", "seconds"),
        ("start-up to step 1: peak MB", "startup", "peak_mb"),
        ("DataLoader worker RSS (median of 4): MB", "workers", "worker_rss_mb"),
        ("DataLoader worker private (USS): MB", "workers", "worker_uss_mb"),
        ("... records not packed, no gc.freeze: RSS MB", "workers_unpacked", "worker_rss_mb"),
        ("... records not packed, no gc.freeze: USS MB", "workers_unpacked", "worker_uss_mb"),
    ]
    head = "| records | " + " | ".join(f"{n:,}" for n in sizes) + " | growth per 10x |"
    lines = [head, "|---|" + "---:|" * (len(sizes) + 1)]
    for label, stage, key in rows:
        values = [results[n].get(stage, {}).get(key) for n in sizes]
        cells = ["" if v is None else f"{v:.1f}" for v in values]
        growth = ""
        have = [(n, v) for n, v in zip(sizes, values, strict=True) if v]
        if len(have) >= 2:
            (n0, v0), (n1, v1) = have[0], have[-1]
            import math

            growth = f"{(v1 / v0) ** (1 / math.log10(n1 / n0)):.2f}x"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {growth} |")
    return "\n".join(lines)


START = time.perf_counter()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--records", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--root", default="/tmp/umbrella-scale")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--out")
    parser.add_argument(
        "--keep-index", action="store_true", help="keep the header index of an earlier run"
    )
    parser.add_argument("--stage", nargs=4, metavar=("STAGE", "MANIFEST", "CACHE", "OUT"))
    args = parser.parse_args()
    if args.stage:
        stage, manifest, cache, out = args.stage
        result = globals()[f"stage_{stage}"](Path(manifest), Path(cache), Path(out))
        result["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return
    root = Path(args.root)
    results: dict[int, dict[str, dict[str, float]]] = {}
    for n in args.records:
        manifest = make_cohort(root, n)
        cache = root / f"cache-{n}" / "preprocessed"
        out = root / f"run-{n}"
        if not args.keep_index:
            shutil.rmtree(cache.parent, ignore_errors=True)
        results[n] = {}
        for stage in args.stages:
            if stage in ("check", "validate"):
                results[n][f"{stage}-first"] = run_stage(stage, manifest, cache, out)
                results[n][f"{stage}-second"] = run_stage(stage, manifest, cache, out)
            else:
                results[n][stage] = run_stage(stage, manifest, cache, out)
            print(n, stage, results[n].get(stage) or results[n].get(f"{stage}-second"), flush=True)
    text = table(results)
    print(text)
    if args.out:
        command = " ".join(["python", "benchmarks/scale.py", *sys.argv[1:]])
        Path(args.out).write_text(f"    {command}\n\n{text}\n")
        Path(args.out).with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
