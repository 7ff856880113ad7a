"""Loading benchmark: from a T1 ``.nii.gz`` to a model-ready tensor.

Compares, on realistic volumes (the t1 plugin's anatomy-like phantom with noise
and bias field, int16, 160x192x160, 1 mm):

  (a) nibabel's plain decode       np.asanyarray(nib.load(path).dataobj)
  (a2) the same through Python's gzip module (nibabel without indexed_gzip)
  (b) a standard MONAI pipeline    LoadImage, EnsureChannelFirst, NormalizeIntensity, Resize
  (c) UMBRELLA's .nii.gz path      the t1 plugin's loader (decode, RAS, resize, normalise)
  (d) UMBRELLA's cache path        the same tensor from the preprocessed cache
  (d1) the same, first read of the entry in a process: the entry is checked
      (checksum trailer, CRC-32 of the array, no NaN or infinite value) before
      the memory-map fast path takes over
  (e) one 24-frame fMRI window from the cache, against reading the whole
      preprocessed series (all its windows) from the cache (a 240-frame BOLD
      phantom, 64x64x48 after preprocessing)
  (g) the same window without a cache, from the .nii.gz: (g0) cut from the
      whole series preprocessed (the path before windows were read alone);
      read alone (``Windows.window``): (g1) the first window of the file (the
      series' statistics computed and saved), (g2) the next (the gzip index
      built and saved), (g3) any later one (saved statistics and index; nothing
      is held in memory between reads, so each is a first read in a process);
      (g4) decoding only: its 24 frames through the saved index, and the whole file
  (h) augmentation (``data.augment``) of one sample, per worker (1 thread): the
      t1 ``light`` preset on (d)'s 128^3 tensor as configured (each step at its
      ``prob``; the mean over draws, what a worker pays per sample), (h1) the
      same with every step firing, and each step's own cost, and (h2) an
      augmented sample from the cache, (d) then (h) (mean); (h3) the fmri
      ``light`` preset on one 24-frame window, (e)'s, as configured (mean)
  (i) a DataLoader with 4 worker processes (forked, 1 thread each, batches of
      2) over the files, ``--repeats`` + 1 passes an epoch: augmented t1 samples
      per second in the second epoch (the workers started), from the cache, (i1)
      the same not augmented, (i2) augmented from the ``.nii.gz`` (no cache)

(b), (c), (d) and (d1) produce a (1, 128, 128, 128) float32 tensor. Each
pipeline runs over every file, ``--repeats`` times, interleaved, after one
warm-up pass; the table gives medians per file and ratios to (a) and (b) from
the same run. (f) times the checksum alone over one cached entry: the ISA-L
CRC-32 the cache uses, zlib's CRC-32 and BLAKE2b (hashlib), for comparison.

    python benchmarks/loading.py --files 8 --repeats 5 --out benchmarks/results/loading.md
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np


def nibabel_gzip_decode(path: str) -> np.ndarray:
    """(a) with Python's gzip module, as nibabel reads without ``indexed_gzip`` installed.

    nibabel decodes a ``.nii.gz`` through ``indexed_gzip`` whenever it is
    importable, and umbrella-core depends on it (``imaging.read_frames``), so
    (a) runs through it: this keeps the baseline of the earlier runs.
    """
    import nibabel._compression as compression

    saved, compression.HAVE_INDEXED_GZIP = compression.HAVE_INDEXED_GZIP, False
    try:
        return np.asanyarray(nib.load(path).dataobj)
    finally:
        compression.HAVE_INDEXED_GZIP = saved


def make_files(folder: Path, count: int) -> list[str]:
    from umbrella_t1.phantom import make_t1_phantom

    from umbrella_core.imaging import save_nifti

    paths = []
    for i in range(count):
        rng = np.random.default_rng(i)
        (part,) = make_t1_phantom(
            rng, ("left", "right")[i % 2], shape=(160, 192, 160), voxel_size=(1.0, 1.0, 1.0)
        )
        paths.append(save_nifti(folder / f"sub-{i:02d}_T1w.nii.gz", part.data, part.affine))
    return paths


def fmri_windows(folder: Path, repeats: int) -> tuple[list[float], list[float]]:
    """Times of reading one window, and the whole series, from the cache."""
    from umbrella_fmri.phantom import make_bold_phantom

    from umbrella_core.data.cache import PreprocessedCache
    from umbrella_core.imaging import save_nifti
    from umbrella_core.plugins import get_plugin_manager

    spec = get_plugin_manager().resolve_modality("fmri").item  # 64x64x48x24, stride 24
    (part,) = make_bold_phantom(np.random.default_rng(0), "left", frames=240)
    path = save_nifti(folder / "sub-01_task-rest_bold.nii.gz", part.data, part.affine, tr=part.tr)
    cache = PreprocessedCache(folder / "fmri-cache", {"fmri": "bench"})
    cache.window(spec, (path,), 0)  # preprocess once
    (entry,) = (folder / "fmri-cache" / "fmri").glob("*-w24s24.npy")
    windows, series = [], []
    count = spec.window_count(240)
    for r in range(repeats * 4):
        start = time.perf_counter()
        cache.window(spec, (path,), r % count)
        windows.append(time.perf_counter() - start)
        start = time.perf_counter()
        np.array(np.load(entry, mmap_mode="r"))
        series.append(time.perf_counter() - start)
    return windows, series


def fmri_partial(folder: Path, repeats: int) -> dict[str, float]:
    """Median times of one window without a cache: (g0) to (g4) of the module's docstring."""
    import os
    import shutil

    from umbrella_core.data.dataset import load_image
    from umbrella_core.imaging import load_nifti, read_frames
    from umbrella_core.plugins import get_plugin_manager

    spec = get_plugin_manager().resolve_modality("fmri").item
    path = str(folder / "sub-01_task-rest_bold.nii.gz")  # fmri_windows wrote it
    count = spec.window_count(spec.windows.frames(spec, (path,)))
    root = folder / "umbrella-cache"
    saved, os.environ["UMBRELLA_CACHE"] = os.environ.get("UMBRELLA_CACHE"), str(root)
    series = root / "series"
    keys = ("g0", "g1", "g2", "g3", "g4 frames", "g4 file")
    times: dict[str, list[float]] = {key: [] for key in keys}

    def timed(key: str, run, *args, **kwargs) -> None:
        start = time.perf_counter()
        run(*args, **kwargs)
        times[key].append(time.perf_counter() - start)

    def whole(window: int) -> None:
        np.asarray(spec.windows.series(spec, (path,)))[..., spec.window_slice(window)]

    try:
        for r in range(repeats):
            window = r % count
            timed("g0", whole, window)
            shutil.rmtree(series, ignore_errors=True)
            timed("g1", load_image, spec, (path,), window=window)
            timed("g2", load_image, spec, (path,), window=(window + 1) % count)
            assert list((series / "gzip").glob("*.gzidx")), "no gzip index was saved"
            for i in range(4):
                timed("g3", load_image, spec, (path,), window=(window + 2 + i) % count)
                first = spec.window_start((window + i) % count)
                timed("g4 frames", read_frames, path, first, first + spec.shape[-1])
            timed("g4 file", load_nifti, path)
    finally:
        if saved is None:
            del os.environ["UMBRELLA_CACHE"]
        else:
            os.environ["UMBRELLA_CACHE"] = saved
    index_bytes = sum(f.stat().st_size for f in (series / "gzip").glob("*.gzidx"))
    stats_bytes = sum(f.stat().st_size for f in (series / "fmri").glob("*.npz"))
    return {
        **{key: statistics.median(t) for key, t in times.items()},
        "index bytes": float(index_bytes),
        "statistics bytes": float(stats_bytes),
        "file bytes": float(Path(path).stat().st_size),
    }


def augmentation(paths: list[str], spec: object, cache: object, repeats: int) -> dict[str, float]:
    """Times of (h) and (h2) (means), (h1) and its steps (medians), over the cached tensors."""
    import copy

    import torch

    from umbrella_core.augmentation import build_pipelines
    from umbrella_core.data.dataset import load_image
    from umbrella_core.plugins import get_plugin_manager

    offered = get_plugin_manager().augmentations()
    light = build_pipelines({"t1": "light"}, {"t1": spec}, offered)["t1"]
    fired = copy.deepcopy(light)
    for step in fired.steps:
        step.transform.prob = 1.0
    tensors = [torch.as_tensor(load_image(spec, (p,), cache=cache)) for p in paths]
    times: dict[str, list[float]] = {"h": [], "h1": [], "h2": []}
    times.update({f"h1 {step.name}": [] for step in fired.steps})

    def timed(key: str, run, *arguments) -> None:
        start = time.perf_counter()
        run(*arguments)
        times[key].append(time.perf_counter() - start)

    def from_cache(path: str, seed: tuple[int, ...]) -> None:
        light.apply(load_image(spec, (path,), cache=cache), seed)

    draw = 0
    for _ in range(repeats * 2):
        for path, tensor in zip(paths, tensors, strict=True):
            draw += 1
            seed = (0, 0, draw, 0)
            timed("h", light.apply, tensor, seed)
            timed("h1", fired.apply, tensor, seed)
            timed("h2", from_cache, path, seed)
            for step in fired.steps:
                step.transform.set_random_state(draw)
                timed(f"h1 {step.name}", step.transform, tensor)
    medians = {key: statistics.median(t) for key, t in times.items()}
    # Each step fires with its prob: a worker's cost per sample is the mean over draws.
    means = {"h": statistics.fmean(times["h"]), "h2": statistics.fmean(times["h2"])}
    return medians | means | {"h median": medians["h"]}


def fmri_augmentation(folder: Path, repeats: int) -> float:
    """Median time of the fmri ``light`` preset on (e)'s cached windows."""
    import torch

    from umbrella_core.augmentation import build_pipelines
    from umbrella_core.data.cache import PreprocessedCache
    from umbrella_core.plugins import get_plugin_manager

    pm = get_plugin_manager()
    spec = pm.resolve_modality("fmri").item
    light = build_pipelines({"fmri": "light"}, {"fmri": spec}, pm.augmentations())["fmri"]
    cache = PreprocessedCache(folder / "fmri-cache", {"fmri": "bench"})
    path = str(folder / "sub-01_task-rest_bold.nii.gz")  # fmri_windows wrote it
    count = spec.window_count(240)
    windows = [torch.as_tensor(cache.window(spec, (path,), w)) for w in range(count)]
    times = []
    for draw in range(repeats * 8):
        start = time.perf_counter()
        light.apply(windows[draw % count], (0, 0, draw, 0))
        times.append(time.perf_counter() - start)
    return statistics.fmean(times)  # the mean over draws, as (h)


class _Samples:
    """t1 samples for (i): from the cache or the .nii.gz, augmented or not, 1 thread each."""

    def __init__(self, paths: list[str], spec: object, cache_dir: Path | None, light: object):
        self.paths, self.spec, self.cache_dir, self.light = paths, spec, cache_dir, light

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, draw: int) -> object:
        import torch

        from umbrella_core.data.cache import PreprocessedCache
        from umbrella_core.data.dataset import load_image

        torch.set_num_threads(1)
        cache = PreprocessedCache(self.cache_dir, {"t1": "bench"}) if self.cache_dir else None
        image = torch.as_tensor(load_image(self.spec, (self.paths[draw],), cache=cache))
        return self.light.apply(image, (0, 0, draw, 0))[0] if self.light else image


def loader_rates(paths: list[str], spec: object, cache_dir: Path, repeats: int) -> dict[str, float]:
    """Samples per second of (i), (i1), (i2): an epoch of 4 forked workers, after a first one."""
    from torch.utils.data import DataLoader

    from umbrella_core.augmentation import build_pipelines
    from umbrella_core.plugins import get_plugin_manager

    light = build_pipelines({"t1": "light"}, {"t1": spec}, get_plugin_manager().augmentations())
    # 4 workers on a smaller machine: torch warns; the rate then says what that machine gives.
    warnings.filterwarnings("ignore", message="This DataLoader will create")
    rates = {}
    for key, dataset in (
        ("i", _Samples(paths, spec, cache_dir, light["t1"])),
        ("i1", _Samples(paths, spec, cache_dir, None)),
        ("i2", _Samples(paths, spec, None, light["t1"])),
    ):
        loader = DataLoader(
            dataset,
            batch_size=2,
            num_workers=4,
            persistent_workers=True,
            sampler=list(range(len(paths))) * (repeats + 1),
            multiprocessing_context="fork",
        )
        for _ in loader:  # a first epoch starts the (persistent) workers
            pass
        start, samples = time.perf_counter(), 0
        for batch in loader:
            samples += len(batch)
        rates[key] = samples / (time.perf_counter() - start)
    return rates


def checksums(entry: Path, repeats: int) -> dict[str, float]:
    """Median times of hashing one cached entry's array (memory-mapped, in the page cache)."""
    import hashlib
    import zlib

    from umbrella_core.data.cache_format import checksum

    array = np.load(entry, mmap_mode="r")
    hashes = {
        "ISA-L CRC-32 (the cache's)": lambda: checksum(array),
        "zlib CRC-32": lambda: zlib.crc32(memoryview(array)),
        "BLAKE2b-128": lambda: hashlib.blake2b(memoryview(array), digest_size=16).digest(),
    }
    times: dict[str, list[float]] = {name: [] for name in hashes}
    for _ in range(repeats * 4):
        for name, run in hashes.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, help="write the markdown table here")
    args = parser.parse_args()

    import torch
    from monai.transforms import Compose, EnsureChannelFirst, LoadImage, NormalizeIntensity, Resize

    from umbrella_core.data.cache import PreprocessedCache
    from umbrella_core.data.dataset import load_image
    from umbrella_core.plugins import get_plugin_manager

    torch.set_num_threads(1)  # one DataLoader worker's view: no intra-op parallelism
    spec = get_plugin_manager().resolve_modality("t1").item  # default geometry, 128^3
    monai = Compose(
        [LoadImage(image_only=True), EnsureChannelFirst(), NormalizeIntensity(), Resize(spec.shape)]
    )
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        paths = make_files(folder, args.files)
        cache = PreprocessedCache(folder / "cache", {"t1": "bench"})

        def first_read(path: str) -> object:
            # A fresh cache object has verified nothing: as a new process (a
            # DataLoader worker of a new epoch) reads the entry the first time.
            fresh = PreprocessedCache(folder / "cache", {"t1": "bench"})
            tensor = load_image(spec, (path,), cache=fresh)
            assert fresh.stats.hits == 1, "the first read did not find a sound entry"
            return tensor

        pipelines = {
            "(a) nibabel plain decode": lambda p: np.asanyarray(nib.load(p).dataobj),
            "(a2) the same, nibabel's gzip reader": nibabel_gzip_decode,
            "(b) MONAI pipeline": lambda p: monai(p),
            "(c) UMBRELLA .nii.gz path": lambda p: load_image(spec, (p,)),
            "(d) UMBRELLA cache path": lambda p: load_image(spec, (p,), cache=cache),
            "(d1) UMBRELLA cache path, first read in a process": first_read,
        }
        for run in pipelines.values():  # warm-up; fills the cache for (d)
            for p in paths:
                run(p)
        times: dict[str, list[float]] = {name: [] for name in pipelines}
        for _ in range(args.repeats):
            for name, run in pipelines.items():
                for p in paths:
                    start = time.perf_counter()
                    run(p)
                    times[name].append(time.perf_counter() - start)
        assert cache.stats.misses == len(paths), "the cache missed after warm-up"
        entry = next((folder / "cache" / "t1").glob("*.npy"))
        hash_times = checksums(entry, args.repeats)
        augment = augmentation(paths, spec, cache, args.repeats)
        augment.update(loader_rates(paths, spec, folder / "cache", args.repeats))
        window_times, series_times = fmri_windows(folder, args.repeats)
        partial = fmri_partial(folder, args.repeats)
        augment["h3"] = fmri_augmentation(folder, args.repeats)
    medians = {name: statistics.median(t) for name, t in times.items()}
    e_window, e_series = statistics.median(window_times), statistics.median(series_times)
    a, b = medians["(a) nibabel plain decode"], medians["(b) MONAI pipeline"]
    lines = [
        f"    python benchmarks/loading.py {shlex.join(sys.argv[1:])}",
        "",
        f"{args.files} files of 160x192x160 int16 .nii.gz, {args.repeats} repeats, "
        "1 torch thread; medians per file",
        "",
        "| pipeline | median ms | vs (a) | vs (b) |",
        "|---|---:|---:|---:|",
    ]
    for name, m in medians.items():
        lines.append(f"| {name} | {m * 1000:.1f} | {m / a:.2f}x | {m / b:.2f}x |")
    c, d = medians["(c) UMBRELLA .nii.gz path"], medians["(d) UMBRELLA cache path"]
    a2 = medians["(a2) the same, nibabel's gzip reader"]
    d1 = medians["(d1) UMBRELLA cache path, first read in a process"]
    lines += [
        "",
        f"- (c) is {b / c:.1f}x faster than (b) (target >= 2x) and {a / c:.2f}x the speed of (a) "
        "(target >= 1x); against (a2), nibabel without indexed_gzip: "
        f"{a2 / c:.2f}x",
        f"- (d) is {a / d:.1f}x faster than (a) (target >= 20x)",
        f"- (d1) is {a / d1:.1f}x faster than (a) (target >= 20x); the check costs "
        f"{(d1 - d) * 1000:.2f} ms on the first read of an entry in a process",
        "- (f) checksum of one 128^3 float32 entry (8 MiB): "
        + ", ".join(f"{name} {t * 1000:.2f} ms" for name, t in hash_times.items()),
        f"- (e) one 24-frame window: {e_window * 1000:.2f} ms; the whole 240-frame series: "
        f"{e_series * 1000:.2f} ms; window / series = {e_window / e_series:.1%} (target <= 20%)",
        "- (g) one 24-frame window without a cache, from the 240-frame .nii.gz ("
        f"{partial['file bytes'] / 2**20:.1f} MiB): (g0) cut from the whole series "
        f"{partial['g0'] * 1000:.0f} ms; read alone: (g1) first window of the file "
        f"{partial['g1'] * 1000:.0f} ms, (g2) next (gzip index built) {partial['g2'] * 1000:.0f} "
        f"ms, (g3) later {partial['g3'] * 1000:.1f} ms; (g3) / (g0) = "
        f"{partial['g3'] / partial['g0']:.1%} (the cache's (e): {e_window / e_series:.1%}); "
        f"saved per file: gzip index {partial['index bytes'] / 2**20:.2f} MiB, statistics "
        f"{partial['statistics bytes'] / 2**20:.2f} MiB",
        f"- (g4) decoding only: 24 frames through the saved index {partial['g4 frames'] * 1000:.1f}"
        f" ms, the whole file {partial['g4 file'] * 1000:.1f} ms "
        f"({partial['g4 frames'] / partial['g4 file']:.1%})",
    ]
    fired = ", ".join(f"{k[3:]} {v * 1000:.0f}" for k, v in augment.items() if k.startswith("h1 "))
    lines += [
        "- (h) t1 `light` augmentation of one 128^3 sample, as configured (mean over draws; "
        f"median {augment['h median'] * 1000:.1f} ms): {augment['h'] * 1000:.1f} ms = "
        f"{augment['h'] / a:.2f}x (a), {augment['h'] / c:.2f}x (c) (target: below (a), "
        f"decoding the .nii.gz); (h1) every step firing: {augment['h1'] * 1000:.1f} ms "
        f"({augment['h1'] / a:.2f}x (a); per step, ms: {fired}); (h2) from the cache, "
        f"augmented: {augment['h2'] * 1000:.1f} ms = {augment['h2'] / c:.2f}x (c)",
        "- (h3) fmri `light` augmentation of one 24-frame window (mean): "
        f"{augment['h3'] * 1000:.1f} ms (its read from the cache, (e): {e_window * 1000:.2f} ms)",
        f"- (i) 4 forked DataLoader workers, batches of 2: {augment['i']:.1f} augmented t1 "
        f"samples/s from the cache, (i1) {augment['i1']:.1f} not augmented, (i2) "
        f"{augment['i2']:.1f} augmented from the .nii.gz: with the cache the loader keeps "
        f"ahead of any step slower than {1000 / augment['i']:.0f} ms per sample",
    ]
    medians.update({f"({key})": value for key, value in augment.items()})
    medians["(e) window"], medians["(e) series"] = e_window, e_series
    medians.update({f"({key})": value for key, value in partial.items()})
    medians.update({f"(f) {name}": t for name, t in hash_times.items()})
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n")
        args.out.with_suffix(".json").write_text(json.dumps(medians, indent=2) + "\n")


if __name__ == "__main__":
    main()
