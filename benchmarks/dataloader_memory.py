"""Peak memory of a DataLoader with 2 workers over T1 volumes: bounded, not growing with the data.

Runs one epoch over N phantom T1 files (160x192x160 int16 .nii.gz, preprocessed
to 128^3 by the t1 plugin) for two values of N, each in a fresh process, and
reports the peak resident memory of the main process and of the workers
(``getrusage``). Nothing caches the dataset in RAM, so the peaks should not grow
with N.

    python benchmarks/dataloader_memory.py --files 8 64 \
        --out benchmarks/results/dataloader_memory.md
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path


def one_run(folder: str, count: int) -> dict[str, float]:
    from torch.utils.data import DataLoader

    from umbrella_core.data.collate import UmbrellaCollator
    from umbrella_core.data.conversation import Tokenization
    from umbrella_core.data.dataset import RecordDataset
    from umbrella_core.model.tokenizer import build_byte_tokenizer
    from umbrella_core.plugins import get_plugin_manager
    from umbrella_core.types import ImageRef, StudyRecord, Turn

    spec = get_plugin_manager().resolve_modality("t1").item
    paths = sorted(Path(folder).glob("*_T1w.nii.gz"))
    records = [
        StudyRecord(
            subject=f"s{i}",
            images=[ImageRef(modality="t1", paths=[str(paths[i % len(paths)])])],
            turns=[
                Turn(role="user", content="<image>\nSide?"),
                Turn(role="assistant", content="left"),
            ],
        )
        for i in range(count)
    ]
    tokenizer = build_byte_tokenizer()
    specs = {"t1": spec}
    dataset = RecordDataset(records, specs, Tokenization.of(tokenizer, 4, specs, 2048))
    loader = DataLoader(
        dataset, batch_size=4, num_workers=2, collate_fn=UmbrellaCollator(0, ("t1",))
    )
    seen = 0
    for batch in loader:
        seen += batch["pixel_values"]["t1"].shape[0]
    assert seen == count
    del loader
    kib = 1024.0
    return {
        "files": count,
        "main_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / kib,
        "worker_peak_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / kib,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--distinct", type=int, default=8, help="distinct files written")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_run(args.child[0], int(args.child[1]))))
        return
    sys.path.insert(0, str(Path(__file__).parent))
    from loading import make_files

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        make_files(Path(tmp), args.distinct)
        for count in args.files:
            out = subprocess.run(
                [sys.executable, __file__, "--child", tmp, str(count)],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
    lines = [
        "DataLoader, 2 workers, batch 4, t1 at 128^3 from 160x192x160 .nii.gz; "
        "peak resident memory (getrusage)",
        "",
        "| samples per epoch | main process peak MiB | largest worker peak MiB |",
        "|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['files']} | {row['main_peak_mib']:.0f} | {row['worker_peak_mib']:.0f} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
