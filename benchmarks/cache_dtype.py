"""Cache dtype benchmark: float32 against float16 entries (``data.cache_dtype``).

Per dtype, on the modalities' default geometry:

  - bytes on disk per sample: a T1 entry, (1, 128, 128, 128), from the t1
    plugin's anatomy-like phantom (160x192x160 int16 at 1 mm), and one fMRI
    window, (1, 64, 64, 48, 24), of a 240-frame BOLD phantom (its entry holds
    10 windows: the entry's bytes / 10)
  - median time of a read through ``load_image`` (what a DataLoader worker
    does; float32 tensors either way): ``cold``, the entry's pages dropped from
    the page cache first (``posix_fadvise(DONTNEED)``: the bytes come from the
    disk, as on a first epoch over a cache larger than memory); ``first``, the
    first read of the entry in a process (a fresh ``PreprocessedCache``: the
    entry is checked, checksum and finite values), pages in memory; ``later``,
    later reads in that process (memory-mapped, no check)
  - the largest error of the float16 read, relative to the image's largest
    magnitude, against the float32 read

Reads of the two dtypes are interleaved (files, then dtypes, then repeats);
one torch thread, as in a DataLoader worker. With ``--demo``, then the quick
start's demo (``umbrella train --modalities t1,dmri --cache``) once per dtype,
one after the other, each after ``umbrella cache build --cache-dtype`` of its
dtype, and the held-out accuracy and MAE of each run's ``metrics.json``.
Give ``--workdir`` on the disk a cache would live on: on a tmpfs (``/tmp`` on
some systems) a cold read reads memory.

    python benchmarks/cache_dtype.py --files 4 --repeats 7 --demo \\
        --out benchmarks/results/cache_dtype.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DTYPES = ("float32", "float16")
KINDS = ("cold", "first", "later")


def evict(path: Path) -> None:
    """Drop a file's pages from the page cache (written back first: dirty pages stay)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def t1_files(folder: Path, count: int) -> list[str]:
    from umbrella_t1.phantom import make_t1_phantom

    from umbrella_core.imaging import save_nifti

    paths = []
    for i in range(count):
        (part,) = make_t1_phantom(
            np.random.default_rng(i),
            ("left", "right")[i % 2],
            shape=(160, 192, 160),
            voxel_size=(1.0, 1.0, 1.0),
        )
        paths.append(save_nifti(folder / f"sub-{i:02d}_T1w.nii.gz", part.data, part.affine))
    return paths


def bold_file(folder: Path) -> str:
    from umbrella_fmri.phantom import make_bold_phantom

    from umbrella_core.imaging import save_nifti

    (part,) = make_bold_phantom(np.random.default_rng(0), "left", frames=240)
    return save_nifti(folder / "sub-01_task-rest_bold.nii.gz", part.data, part.affine, tr=part.tr)


def measure(
    root: Path, spec, samples: list[tuple[tuple[str, ...], int | None]], repeats: int
) -> dict:
    """Bytes per sample, read times per kind and dtype, float16's error, for one modality.

    ``samples``: (paths, window) pairs; window None for a modality without windows.
    """
    from umbrella_core.data.cache import PreprocessedCache
    from umbrella_core.data.dataset import load_image

    def cache(dtype: str) -> PreprocessedCache:
        return PreprocessedCache(root, {spec.name: "bench"}, dtype=dtype)

    def entry(c: PreprocessedCache, paths: tuple[str, ...]) -> Path:
        return c.window_entry(spec, paths) if spec.windowed else c.entry(spec, paths)

    warm = {dtype: cache(dtype) for dtype in DTYPES}
    reads = {}
    for dtype in DTYPES:  # build (untimed), and keep what each dtype gives the model
        reads[dtype] = [
            load_image(spec, paths, cache=warm[dtype], window=window).numpy()
            for paths, window in samples
        ]
    entries = {dtype: {entry(warm[dtype], paths) for paths, _ in samples} for dtype in DTYPES}
    windows = spec.window_count(240) if spec.windowed else 1
    size = {d: statistics.mean(os.path.getsize(e) for e in entries[d]) / windows for d in DTYPES}
    error = max(
        float(np.max(np.abs(h - f)) / np.max(np.abs(f)))
        for h, f in zip(reads["float16"], reads["float32"], strict=True)
    )
    times: dict[str, dict[str, list[float]]] = {d: {k: [] for k in KINDS} for d in DTYPES}
    for _ in range(repeats):
        for paths, window in samples:
            for dtype in DTYPES:
                for kind in KINDS:
                    reader = warm[dtype] if kind == "later" else cache(dtype)
                    if kind == "cold":
                        evict(entry(reader, paths))
                    hits = reader.stats.hits
                    start = time.perf_counter()
                    load_image(spec, paths, cache=reader, window=window)
                    times[dtype][kind].append(time.perf_counter() - start)
                    assert reader.stats.hits == hits + 1, f"{dtype} {kind}: the cache missed"
    medians = {d: {k: statistics.median(t) for k, t in times[d].items()} for d in DTYPES}
    return {"bytes": size, "ms": medians, "error": error, "reads": len(times["float32"]["cold"])}


def io_table(results: dict[str, dict]) -> list[str]:
    lines = [
        "| sample | dtype | bytes on disk | cold read ms | first read ms | later read ms |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        for dtype in DTYPES:
            ms = r["ms"][dtype]
            lines.append(
                f"| {name} | {dtype} | {r['bytes'][dtype]:,.0f} | "
                + " | ".join(f"{ms[k] * 1000:.2f}" for k in KINDS)
                + " |"
            )
        half, full = r["ms"]["float16"], r["ms"]["float32"]
        lines.append(
            f"| {name} | **float16 / float32** | "
            f"**{r['bytes']['float16'] / r['bytes']['float32']:.3f}** | "
            + " | ".join(f"**{half[k] / full[k]:.2f}**" for k in KINDS)
            + " |"
        )
    lines.append("")
    for name, r in results.items():
        lines.append(
            f"- {name}: {r['reads']} reads per cell; float16's largest error, relative to the "
            f"image's largest magnitude: {r['error']:.2e} (2^-11 = {2.0**-11:.2e})"
        )
    return lines


def run_demo(dtype: str, workdir: Path) -> dict:
    """``umbrella cache build`` then ``umbrella train --cache`` at ``dtype``, in fresh processes."""
    from umbrella_core.data.cache import PreprocessedCache

    env = dict(os.environ, OMP_NUM_THREADS="2")
    umbrella = [sys.executable, "-m", "umbrella_core.commands"]
    demo = ["--modalities", "t1,dmri"]
    root = Path(env["UMBRELLA_CACHE"]) / "preprocessed"
    others = set(PreprocessedCache(root, {}).entries())  # the other dtype's
    started = time.perf_counter()
    log = workdir / f"demo-{dtype}.log"
    with log.open("w") as stream:
        subprocess.check_call(
            [*umbrella, "cache", "build", *demo, "--cache-dtype", dtype],
            stdout=stream, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    built = time.perf_counter() - started
    before = set(PreprocessedCache(root, {}).entries()) - others
    out = workdir / f"run-{dtype}"
    started = time.perf_counter()
    with log.open("a") as stream:
        code = subprocess.call(
            [*umbrella, "train", *demo, "--cache", "--set", f"data.cache_dtype={dtype}",
             "--output-dir", str(out), "--no-progress"],
            stdout=stream, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    seconds = time.perf_counter() - started
    after = set(PreprocessedCache(root, {}).entries()) - others
    metrics = json.loads((out / "metrics.json").read_text()) if code == 0 else {}
    return {
        "dtype": dtype,
        "code": code,
        "log": str(log),
        "build_s": built,
        "train_s": seconds,
        "entries": len(before),
        "new_entries_in_training": len(after - before),
        "bytes": sum(p.stat().st_size for p in before),
        "metrics": metrics,
    }


def _categorical(held_out: dict) -> tuple[float, float] | None:
    for question in held_out.get("questions", {}).values():
        if question["family"] == "categorical":
            return question["metrics"]["accuracy"], question["metrics"]["balanced_accuracy"]
    return None


def _numeric(held_out: dict) -> tuple[float, float] | None:
    for question in held_out.get("questions", {}).values():
        metrics = question["metrics"]
        if question["family"] == "numeric" and metrics.get("mae") is not None:
            return metrics["mae"], metrics["reference"]["mae_train_mean"]
    return None


def demo_table(runs: list[dict]) -> list[str]:
    modalities = ("t1", "dmri")
    head = ["dtype"]
    for m in modalities:
        head += [f"{m} accuracy (balanced)", f"{m} MAE cm (train mean)"]
    head += ["best step", "cache MiB", "build s", "train s"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in runs:
        held_out = r["metrics"].get("held_out", {})
        cells = [r["dtype"]]
        for m in modalities:
            accuracy, mae = _categorical(held_out.get(m, {})), _numeric(held_out.get(m, {}))
            cells.append(f"{accuracy[0]:.1%} ({accuracy[1]:.1%})" if accuracy else "failed")
            cells.append(f"{mae[0]:.2f} ({mae[1]:.2f})" if mae else "-")
        cells += [
            str(r["metrics"].get("final", {}).get("step", "?")),
            f"{r['bytes'] / 2**20:.1f}",
            f"{r['build_s']:.0f}",
            f"{r['train_s']:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for r in runs:
        lines.append(
            f"- {r['dtype']}: exit {r['code']}; {r['entries']} entries built before training, "
            f"{r['new_entries_in_training']} added by training (0: every read was a hit)"
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=4, help="T1 files")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--demo", action="store_true", help="also train the demo once per dtype")
    parser.add_argument("--workdir", type=Path, help="default: a temporary folder")
    parser.add_argument("--out", type=Path, help="write the markdown here (and .json beside it)")
    args = parser.parse_args()

    import torch

    from umbrella_core.plugins import get_plugin_manager

    torch.set_num_threads(1)  # one DataLoader worker's view: no intra-op parallelism
    pm = get_plugin_manager()
    t1 = pm.resolve_modality("t1").item  # default geometry, 128^3
    fmri = pm.resolve_modality("fmri").item  # 64x64x48x24, stride 24
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="cache-dtype-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        folder = Path(tmp)
        paths = t1_files(folder, args.files)
        bold = bold_file(folder)
        results = {
            "t1 128³": measure(folder / "cache", t1, [((p,), None) for p in paths], args.repeats),
            "fmri window 64x64x48x24": measure(
                folder / "cache",
                fmri,
                [((bold,), i) for i in range(fmri.window_count(240))],
                max(1, args.repeats // 2),
            ),
        }
    lines = [
        f"Reads through `load_image` ({args.files} T1 files; one 240-frame BOLD series, its 10 "
        "windows), 1 torch thread; medians.",
        "",
        *io_table(results),
    ]
    runs = []
    if args.demo:
        os.environ["UMBRELLA_CACHE"] = str(workdir / "umbrella-cache")
        from umbrella_core.config import load_config
        from umbrella_core.data.studies import read_studies

        # Write the demo study first, so that neither timed build includes it.
        read_studies(load_config(None, ["data.modalities=t1,dmri"]), pm)
        runs = [run_demo(dtype, workdir) for dtype in DTYPES]
        lines += [
            "",
            "Demo (`umbrella train --modalities t1,dmri --cache`, every other setting at its "
            "default, OMP_NUM_THREADS=2), held-out `test` records of `final/`:",
            "",
            *demo_table(runs),
        ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
        for r in runs:
            r["metrics"] = {k: r["metrics"].get(k) for k in ("held_out", "final", "steps")}
        dump = {"io": results, "demo": runs}
        args.out.with_suffix(".json").write_text(json.dumps(dump, indent=2) + "\n")
    return 0 if all(r["code"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
