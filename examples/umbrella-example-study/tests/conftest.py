"""A tiny example study written with the t1 plugin's phantom."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from umbrella_core.testing import write_phantom


def write_example_study(folder: Path, subjects: int = 6, test: int = 2) -> Path:
    """``subjects`` phantom T1 scans (labels alternating left/right), the last ``test`` held out."""
    from umbrella_t1.plugin import T1

    spec = T1.for_demo()
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(subjects):
        subject = f"sub-{i:02d}"
        label = spec.demo.labels[i % 2]
        write_phantom(spec, folder, label, seed=i, stem=subject)
        rows.append(
            {
                "subject": subject,
                "label": label,
                "split": "test" if i >= subjects - test else "train",
            }
        )
    with (folder / "subjects.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["subject", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return folder


@pytest.fixture
def example_study(tmp_path: Path) -> Path:
    return write_example_study(tmp_path / "my-study")
