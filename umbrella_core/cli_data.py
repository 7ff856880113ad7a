"""The ``umbrella`` commands about data: ``demo-data``, ``validate`` and ``cache``.

Their parsers are built by :func:`umbrella_core.cli.build_parser`, which sets
these handlers; this module imports nothing of the command line's, so that
the two never import each other.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from umbrella_core.errors import ConfigError

__all__ = ["data_overrides", "cmd_demo_data", "cmd_validate", "cmd_cache"]


def data_overrides(args: argparse.Namespace) -> list[str]:
    """``--set`` values, then ``--modalities`` and ``--study`` as configuration overrides."""
    overrides = list(args.set or [])
    if args.modalities:
        overrides.append(f"data.modalities={args.modalities}")
    if args.study:
        overrides.append("data.studies=" + json.dumps(list(args.study)))
    return overrides


def cmd_demo_data(args: argparse.Namespace) -> int:
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
    config = manifest.parent / RUN_CONFIG
    print(f"train or validate it at its geometry: umbrella train --config {config}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from umbrella_core.augmentation import run_pipelines
    from umbrella_core.config import load_config
    from umbrella_core.data.header_index import HeaderIndex
    from umbrella_core.data.studies import plugin_versions, resolve_specs
    from umbrella_core.plugins import get_plugin_manager
    from umbrella_core.train.run import record_encoder
    from umbrella_core.validate import validate_locations

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
    # The run's augmentation is built as train builds it (names, arguments, shapes);
    # which records a mirror would change, train judges: it knows the split.
    run_pipelines(config, pm, specs, (), lambda _: None)
    # A conversation too long for the run is found here, not at its step 1.
    encode = record_encoder(config, specs)
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
    )
    index.save()
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        for problem in report.problems:
            print(problem)
        print(report.summary())
    return 0 if report.ok else 1


def cmd_cache(args: argparse.Namespace) -> int:
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
