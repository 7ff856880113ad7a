"""The built-in demo study: phantom NIfTI files whose answer depends on the image.

For each modality, every subject gets a phantom from its plugin (written as
real ``.nii.gz`` files) and the question the plugin asks about it; the answer
is the phantom's label (for the first-party plugins: the hemisphere that holds
a lesion), so a model that answers well above chance has learned from the
images. Where the plugin's phantom reports a number (``Demo.measure``: the
lesion's diameter for the first-party plugins), each subject is asked that
too, so a run reports a numeric error (MAE) beside the accuracy. Subjects
are split per modality: a fifth for ``test`` (the table at the end of a run),
a tenth for ``validation`` (evaluation during training and the choice of the
best checkpoint), the rest for ``train``. A modality whose plugin gives no
phantom is left out of the demo, with a line saying so.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from umbrella_core.errors import ConfigError
from umbrella_core.types import IMAGE_PLACEHOLDER, Demo, ModalitySpec

#: The run config written next to a demo study's manifest.
RUN_CONFIG = "run.yaml"

__all__ = [
    "RUN_CONFIG",
    "write_demo",
    "with_phantoms",
    "demo_cache_dir",
    "cached_demo",
    "TEST_FRACTION",
    "VALIDATION_FRACTION",
]

TEST_FRACTION = 0.2
VALIDATION_FRACTION = 0.1
#: Part of the cache key: bump it whenever what write_demo writes changes.
#: 2: a validation split. 3: the phantom's measure asked as a numeric question.
#: 4: the measure's records forbid spatial augmentation (forbid_augment).
FORMAT = 4


def with_phantoms(
    specs: Mapping[str, ModalitySpec], *, log: Callable[[str], None] = print
) -> dict[str, ModalitySpec]:
    """The modalities the demo can show: those whose plugin gives a phantom.

    Each one left out is one line through ``log``, not an error: a modality
    plugin without a phantom must not stop every demo run.

    Raises:
        ConfigError: none of ``specs`` has a phantom.
    """
    kept = {
        name: spec
        for name, spec in specs.items()
        if spec.demo is not None and spec.demo.phantom is not None
    }
    for name in sorted(set(specs) - set(kept)):
        log(f"demo: skipping modality {name!r}: its plugin gives no phantom")
    if not kept:
        raise ConfigError(
            f"the built-in demo has nothing to show: no plugin of {', '.join(sorted(specs))} "
            "gives a phantom; give a study (--study) or choose modalities whose plugins give "
            "phantoms (--modalities)"
        )
    return kept


def write_demo(
    directory: str | os.PathLike,
    specs: Mapping[str, ModalitySpec],
    *,
    subjects: int = 200,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> Path:
    """Write the demo study into ``directory``; returns the manifest path.

    Modalities without a phantom are skipped (see :func:`with_phantoms`).
    """
    specs = with_phantoms(specs, log=log)
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for name in sorted(specs):
        lines += _modality_lines(root, name, specs[name], subjects=subjects, seed=seed)
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    _write_run_config(root, manifest, specs)
    return manifest


def _demo_splits(subjects: int) -> list[str]:
    """The split of each of ``subjects`` subjects: train first, then validation, then test."""
    n_test = max(1, int(round(subjects * TEST_FRACTION)))
    # Small demos (tests) may have none: their runs evaluate on test records.
    n_validation = max(0, min(round(subjects * VALIDATION_FRACTION), subjects - n_test - 1))
    n_train = subjects - n_test - n_validation
    return ["train"] * n_train + ["validation"] * n_validation + ["test"] * n_test


def _modality_lines(
    root: Path, name: str, spec: ModalitySpec, *, subjects: int, seed: int
) -> list[dict[str, Any]]:
    """Write one modality's phantoms under ``root/name``; returns their manifest lines."""
    import numpy as np

    from umbrella_core.imaging import save_nifti

    demo = spec.demo
    assert demo is not None and demo.phantom is not None  # with_phantoms kept it
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    labels = [demo.labels[i % len(demo.labels)] for i in range(subjects)]
    labels = [labels[i] for i in rng.permutation(subjects)]
    splits = _demo_splits(subjects)
    (root / name).mkdir(exist_ok=True)
    lines = []
    for i, label in enumerate(labels):
        subject = f"sub-{name}{i:04d}"
        paths = []
        parts = demo.phantom(spec, rng, label)
        for part in parts:
            rel = f"{name}/{subject}_{part.suffix}.nii.gz"
            save_nifti(root / rel, part.data, part.affine, tr=part.tr)
            paths.append(rel)
        measure = next((p.measure for p in parts if p.measure is not None), None)
        lines += _subject_lines(demo, name, subject, splits[i], paths, label=label, measure=measure)
    return lines


def _subject_lines(
    demo: Demo,
    name: str,
    subject: str,
    split: str,
    paths: list[str],
    *,
    label: str,
    measure: float | None,
) -> list[dict[str, Any]]:
    """A subject's manifest lines: its label asked, and its measure where the demo asks one."""
    asked = [(demo.question, label)]
    if demo.measure and measure is not None:
        unit = f" {demo.measure_unit}" if demo.measure_unit else ""
        asked.append((demo.measure, f"{round(measure)}{unit}"))
    phenotypes = {"label": label} | ({"measure": measure} if measure is not None else {})
    return [
        {
            # The phantoms' measure is a position: whatever moves voxels
            # (a shift, a rotation, a mirror) moves the answer with them.
            **({"forbid_augment": ["spatial"]} if question == demo.measure else {}),
            "subject": subject,
            "split": split,
            "images": [{"modality": name, "path": paths if len(paths) > 1 else paths[0]}],
            "conversation": [
                {"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n{question}"},
                {"role": "assistant", "content": answer},
            ],
            "phenotypes": phenotypes,
        }
        for question, answer in asked
    ]


def _write_run_config(root: Path, manifest: Path, specs: Mapping[str, ModalitySpec]) -> None:
    """Write ``root/run.yaml``: the study and the demo geometry its files are at."""
    # The files are at the demo geometry (short fMRI series, small grids);
    # plugins' default geometry would refuse them, so the study comes with
    # the settings that fit it: --config DIR/run.yaml.
    (root / RUN_CONFIG).write_text(
        json.dumps(  # JSON is YAML
            {
                "data": {
                    "studies": [str(manifest.resolve())],
                    "modalities": sorted(specs),
                    "geometry": {
                        name: {"shape": list(s.shape), "patch_size": list(s.patch_size)}
                        for name, s in sorted(specs.items())
                    },
                }
            },
            indent=2,
        )
        + "\n"
    )


def demo_cache_dir() -> Path:
    """Where demo studies are cached: ``$UMBRELLA_CACHE`` or ``$XDG_CACHE_HOME/umbrella``."""
    base = os.environ.get("UMBRELLA_CACHE")
    if base:
        return Path(base)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "umbrella"


def cached_demo(
    specs: Mapping[str, ModalitySpec],
    provenance: Mapping[str, str],
    *,
    subjects: int,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> Path:
    """The demo manifest for these modalities, written once into the cache and reused.

    Modalities without a phantom are skipped, with a line through ``log`` on
    every call (a cached demo too).

    The cache key holds the modality names, the versions of the plugins that
    provide them, the subject count and the seed, so upgrading a plugin writes
    a fresh demo. Writing goes to a temporary folder renamed into place, so an
    interrupted run never leaves a half-written demo behind.
    """
    specs = with_phantoms(specs, log=log)
    provenance = {name: v for name, v in provenance.items() if name in specs}
    key = json.dumps(
        {
            "format": FORMAT,
            "modalities": sorted(specs),
            "provenance": dict(sorted(provenance.items())),
            "subjects": subjects,
            "seed": seed,
        },
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    target = demo_cache_dir() / f"demo-{'-'.join(sorted(specs))}-{digest}"
    manifest = target / "manifest.jsonl"
    if manifest.is_file():
        return manifest
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    write_demo(tmp, specs, subjects=subjects, seed=seed, log=log)
    try:
        tmp.rename(target)
    except OSError:  # another process finished first: use theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest
