"""What ``umbrella plugins`` shows: the installed modalities and plugins, as text or JSON."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import attrs

from umbrella_core.errors import UmbrellaError
from umbrella_core.plugins import ALLOW_ENV, BLOCK_ENV, PluginManager
from umbrella_core.types import Command

__all__ = ["Listing", "plugins_listing", "PLUGINS"]


@attrs.frozen
class Listing:
    """The listing as JSON (``payload``) and as text, and the errors it found."""

    payload: dict[str, Any]
    text: str
    errors: tuple[str, ...]


def plugins_listing(pm: PluginManager) -> Listing:
    """Every modality (geometry, tokens, provider) and every plugin (status, what it offers)."""
    env = {name: os.environ.get(name, "") for name in (BLOCK_ENV, ALLOW_ENV)}
    infos = pm.plugins()
    errors: list[str] = []
    try:
        registry = pm.modality_registry()
    except UmbrellaError as exc:
        registry = {}
        errors.append(str(exc))
    payload = {
        "plugins": [info.to_json() for info in infos],
        "modalities": [
            {
                "name": name,
                "aliases": list(p.item.aliases),
                "ndim": p.item.ndim,
                "channels": p.item.channels,
                "shape": list(p.item.shape),
                "patch_size": list(p.item.patch_size),
                "tokens": p.item.num_tokens,
                "description": p.item.description,
                "plugin": p.plugin,
                "distribution": p.distribution,
                "version": p.version,
            }
            for name, p in registry.items()
        ],
        "errors": list(errors),
        "env": env,
    }
    lines = ["modalities"]
    if not registry:
        lines.append("  (none installed: pip install umbrella-t1 umbrella-fmri umbrella-dmri)")
    for name, p in registry.items():
        spec = p.item
        aliases = f" (aliases: {', '.join(spec.aliases)})" if spec.aliases else ""
        if spec.augment_presets:
            aliases += f"  augment: {', '.join(spec.augment_presets)}"
        lines.append(
            f"  {name:<7} {p.distribution} {p.version}  {spec.ndim}D x{spec.channels}  "
            f"shape {'x'.join(map(str, spec.shape))}  patch {'x'.join(map(str, spec.patch_size))}  "
            f"{spec.num_tokens} tokens{aliases}"
        )
        if spec.description:
            lines.append(f"          {spec.description}")
    lines.append("plugins")
    for info in infos:
        line = f"  {info.name:<10} {info.distribution} {info.version}  [{info.status}]"
        if info.hooks:
            line += "  " + ", ".join(h.removeprefix("umbrella_") for h in info.hooks)
        lines.append(line)
        if info.description:
            lines.append(f"      {info.description}")
        for label, names in (
            ("modalities", info.modalities),
            ("study kinds", info.study_kinds),
            ("loss terms", info.loss_terms),
            ("metrics", info.metrics),
            ("augmentations", info.augmentations),
            ("baselines", info.baselines),
            ("commands", info.commands),
        ):
            if names:
                lines.append(f"      {label}: {', '.join(names)}")
        if info.error:
            lines.append(f"      {info.error}")
    lines += [f"error: {error}" for error in errors]
    lines += [f"{name}={value}" for name, value in env.items() if value]
    lines.append(
        f"(block plugins with {BLOCK_ENV}=name,...; load only some with {ALLOW_ENV}=name,...)"
    )
    return Listing(payload, "\n".join(lines), tuple(errors))


def _plugins(args: argparse.Namespace) -> int:
    from umbrella_core.plugins import get_plugin_manager

    listing = plugins_listing(get_plugin_manager())
    print(json.dumps(listing.payload, indent=2) if args.json else listing.text)
    return 0 if args.json or not listing.errors else 1


def _plugins_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")


PLUGINS = Command(
    name="plugins",
    help="list installed plugins and the modalities they provide",
    add_arguments=_plugins_arguments,
    run=_plugins,
)
