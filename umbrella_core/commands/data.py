"""The ``umbrella`` commands about data: ``demo-data``, ``validate`` and ``cache``."""

from __future__ import annotations

import argparse
import json
from typing import Any

from umbrella_core.errors import ConfigError
from umbrella_core.types import Command

__all__ = ["data_overrides", "DEMO_DATA", "VALIDATE", "CACHE"]


def data_overrides(args: argparse.Namespace) -> list[str]:
    """``--set`` values, then ``--modalities`` and ``--study`` as configuration overrides."""
    overrides = list(args.set or [])
    if args.modalities:
        overrides.append(f"data.modalities={args.modalities}")
    if args.study:
        overrides.append("data.studies=" + json.dumps(list(args.study)))
    return overrides


def _demo_data(args: argparse.Namespace) -> int:
    from umbrella_core.config import load_config
    from umbrella_core.data.demo import RUN_CONFIG, with_phantoms, write_demo
    from umbrella_core.data.studies import resolve_specs
    from umbrella_core.plugins import get_plugin_manager

    overrides = [f"data.modalities={args.modalities}"] if args.modalities else []
    config = load_config(None, overrides)
    specs, _ = resolve_specs(config, get_plugin_manager(), demo=True)
    specs = with_phantoms(specs)
    manifest = write_demo(args.directory, specs, subjects=args.subjects, seed=args.seed)
    print(f"wrote {args.subjects} subjects for each of {', '.join(specs)}: {manifest}")
    run_config = manifest.parent / RUN_CONFIG
    print(f"train or validate it at its geometry: umbrella train --config {run_config}")
    return 0


def _validate(args: argparse.Namespace) -> int:
    from umbrella_core.augmentation import run_pipelines
    from umbrella_core.config import load_config
    from umbrella_core.data.conversation import Tokenization
    from umbrella_core.data.header_index import HeaderIndex
    from umbrella_core.data.studies import plugin_versions, resolve_specs
    from umbrella_core.plugins import get_plugin_manager
    from umbrella_core.validate import distinct_problems, validate_locations

    # Judged as `umbrella train --study LOCATION [--config] [--set]` would
    # judge it: the run's modalities, geometry, tokenizer and max_length.
    config = load_config(args.config, args.set or [])
    locations: list[str | tuple[str, dict[str, Any]]] = list(args.locations)
    locations += [(s.location, dict(s.options)) for s in config.data.studies]
    if not locations:
        raise ConfigError(
            "nothing to validate: give study locations, or a --config with data.studies"
        )
    pm = get_plugin_manager()
    specs, provenance = resolve_specs(config, pm, demo=False)
    # The run's augmentation is built as train builds it (names, arguments, shapes),
    # then judged against the records training could augment, as train judges it.
    run_pipelines(config, pm, specs, (), lambda _: None)
    # A conversation too long for the run is found here, not at its step 1.
    encode = Tokenization.for_run(config.model, specs).encode
    # Images decoded by an earlier validate (unchanged since) are not decoded again.
    index = HeaderIndex.for_setting(config.data.header_index, plugin_versions(provenance))
    report = validate_locations(
        locations,
        pm,
        specs=specs,
        allow_outside_root=config.data.allow_outside_root,
        encode=encode,
        index=index,
        workers=config.data.workers or None,
        augment=lambda records: run_pipelines(
            config, pm, specs, records, lambda _: None, encode=encode
        ),
    )
    index.save()
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        for problem, n in distinct_problems(report.problems):
            print(f"{problem} ({n} records)" if n > 1 else problem)
        for warning in report.warnings:
            print(warning)
        print(report.summary())
    return 0 if report.ok else 1


def _cache(args: argparse.Namespace) -> int:
    from umbrella_core.config import load_config
    from umbrella_core.data.cache import PreprocessedCache, default_cache_root
    from umbrella_core.data.cache_build import build_cache, verify_cache
    from umbrella_core.data.checks import check_image
    from umbrella_core.data.studies import read_studies
    from umbrella_core.plugins import get_plugin_manager

    overrides = data_overrides(args)
    if args.cache_dtype:
        overrides.append(f"data.cache_dtype={args.cache_dtype}")
    config = load_config(args.config, overrides)
    root = args.cache_dir or config.data.cache_dir or default_cache_root()
    if args.action == "info":
        cache = PreprocessedCache(root, {})
        stale = cache.remove_stale()
        print(f"cache: {root}")
        for modality, entry in cache.info().items():
            print(f"  {modality:<8} {entry['entries']} images, {entry['bytes'] / 2**20:.1f} MiB")
        if stale:
            print(f"  removed {len(stale)} temporary file(s) left by killed builds")
        return 0
    whole_folder = args.action == "verify" and not (
        args.config or args.study or args.modalities or args.set
    )
    images = None
    versions: dict[str, str] = {}
    if not whole_folder:
        data = read_studies(config, get_plugin_manager())
        versions = data.versions()
        images = [
            (data.specs[image.modality], tuple(image.paths))
            for record in data.records
            for image in record.images
        ]
    cache = PreprocessedCache(root, versions, dtype=config.data.cache_dtype)
    if args.action == "verify":
        found = verify_cache(cache, images, dry_run=args.dry_run, workers=args.workers)
        for line in found.corrupt:
            print(line)
        if args.dry_run:
            outcome = "left in place (--dry-run)"
        elif images is None:
            outcome = f"{found.removed} removed (rebuilt on their next read or cache build)"
        else:
            outcome = f"{found.removed} removed, {found.rebuilt} rebuilt"
        scope = "the whole folder" if images is None else f"{found.missing} not built yet"
        print(
            f"cache: {root}: {found.checked} entries checked ({scope}), "
            f"{len(found.corrupt)} corrupt: {outcome}"
        )
        return 1 if found.corrupt else 0
    assert images is not None
    # The header checks train and validate apply: nothing they refuse is cached.
    refused: list[str] = []
    sound = []
    for spec, paths in dict.fromkeys(images):
        messages = check_image(spec, paths, decode=False)
        refused += messages
        if not messages:
            sound.append((spec, paths))
    built = build_cache(cache, sound, workers=args.workers)
    problems = refused + built.problems
    for problem in problems:
        print(problem)
    rebuilt = f" ({built.rebuilt} corrupt entries rebuilt)" if built.rebuilt else ""
    print(
        f"cache: {root}: {built.done} images ready as {config.data.cache_dtype}{rebuilt}, "
        f"{len(problems)} refused or could not be read"
    )
    return 1 if problems else 0


def _demo_data_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory")
    p.add_argument("--modalities", help="comma-separated (default: every installed one)")
    p.add_argument("--subjects", type=int, default=240, help="subjects per modality")
    p.add_argument("--seed", type=int, default=0)


def _validate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("locations", nargs="*", metavar="LOCATION", help="a study, as for train --study")
    p.add_argument(
        "--config",
        help="a run's YAML config: also check its data.studies (with their reader options) "
        "and apply its data.preprocessing settings",
    )
    p.add_argument(
        "--set",
        action="append",
        metavar="SECTION.KEY=VALUE",
        help="override a config setting, as for train",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _cache_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["build", "info", "verify"])
    p.add_argument("--study", "--data", dest="study", action="append", metavar="LOCATION")
    p.add_argument("--modalities", help="comma-separated (default: every installed one)")
    p.add_argument("--config", help="YAML run configuration (its geometry decides the shapes)")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE")
    p.add_argument("--cache-dir", help="default: data.cache_dir or $UMBRELLA_CACHE/preprocessed")
    p.add_argument(
        "--cache-dtype",
        choices=["float32", "float16"],
        help="how entries are stored (data.cache_dtype; default float32): build and verify "
        "the entries of that dtype, as a run with it reads them",
    )
    p.add_argument("--workers", type=int, default=1, help="processes that preprocess")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="verify: only list corrupt entries; remove and rebuild nothing",
    )


DEMO_DATA = Command(
    name="demo-data",
    help="write the demo study (phantom .nii.gz files + manifest)",
    add_arguments=_demo_data_arguments,
    run=_demo_data,
)
VALIDATE = Command(
    name="validate",
    help="check studies (records, conversations, image files) and report every problem",
    add_arguments=_validate_arguments,
    run=_validate,
)
CACHE = Command(
    name="cache",
    help="build, inspect or verify the preprocessed-image cache (decode each file once)",
    description=(
        "build: preprocess the run's images into the cache (entries already there are "
        "checked; corrupt ones are rebuilt). info: entries and size per modality; "
        "temporary files of killed builds are not counted, and are removed once their "
        "writer is dead or they are an hour old. verify: read every entry in full "
        "(checksum, shape, dtype, no NaN or infinite value) and list the corrupt ones; "
        "with no --config, --study, --modalities or --set it checks the whole cache "
        "folder and removes corrupt entries (they are rebuilt on their next read or "
        "'cache build'); with them, only the run's entries, and corrupt ones are "
        "rebuilt from their source files. Exit status 1 when any entry was corrupt."
    ),
    add_arguments=_cache_arguments,
    run=_cache,
)
