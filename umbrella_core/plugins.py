"""Plugin discovery, validation and the modality registry.

Plugins are found through the ``umbrella`` entry-point group, loaded lazily and
once per :class:`PluginManager`. A plugin that fails to import is recorded as
broken (``umbrella plugins`` lists it with its error) and does not stop the
others. Two environment variables choose which plugins load, by entry-point
name or distribution name (comma-separated):

* ``UMBRELLA_BLOCK_PLUGINS``: never load these.
* ``UMBRELLA_LOAD_PLUGINS``: load only these (built-ins always load).

A plugin is isolated from the others: one that fails at import or
registration is listed as broken; one whose ``umbrella_modalities`` raises or
returns something other than ModalitySpec values stops the start-up with an
error naming it (plugin, distribution, hook) and is then set aside as broken,
so ``umbrella plugins`` still lists everything. A patch embedder that is not an
``nn.Module``, or whose output for one input is not ``(1, spec.num_tokens,
hidden_size)``, and a loss term that is not a LossTerm are refused when the
model is built, before step 1, naming the plugin.
"""

from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from importlib import metadata
from typing import Any

import attrs
import pluggy

from umbrella_core import hookspecs
from umbrella_core.errors import DuplicateNameError, PluginError, UmbrellaError
from umbrella_core.types import LossTerm, MetricFamily, ModalitySpec, StudyRecord

__all__ = [
    "ENTRY_POINT_GROUP",
    "BLOCK_ENV",
    "ALLOW_ENV",
    "PluginInfo",
    "Provided",
    "PluginManager",
    "get_plugin_manager",
]

ENTRY_POINT_GROUP = "umbrella"
BLOCK_ENV = "UMBRELLA_BLOCK_PLUGINS"
ALLOW_ENV = "UMBRELLA_LOAD_PLUGINS"

#: Built-in plugins: modules of ``umbrella_core.default_plugins`` using the public hooks.
# Order matters: of two ``trylast`` readers pluggy asks the earlier registered one first,
# and the BrainVLM reader must see a .json file before the manifest reader does.
DEFAULT_PLUGINS = (
    "umbrella_core.default_plugins.brainvlm",
    "umbrella_core.default_plugins.manifest",
    "umbrella_core.default_plugins.metrics",
)

CORE_DISTRIBUTION = "umbrella-core"


@attrs.frozen
class PluginInfo:
    """What ``umbrella plugins`` shows about one plugin."""

    name: str
    distribution: str
    version: str
    module: str
    status: str  # "loaded", "broken" or "blocked"
    error: str | None = None
    hooks: tuple[str, ...] = ()
    modalities: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self, recurse=False) | {
            "hooks": list(self.hooks),
            "modalities": list(self.modalities),
        }


@attrs.frozen
class Provided:
    """A registered item and where it came from."""

    item: Any
    plugin: str
    distribution: str
    version: str


def _split_env(value: str | None) -> set[str]:
    return {part.strip().lower() for part in (value or "").split(",") if part.strip()}


def _normalise_dist(name: str) -> str:
    return name.lower().replace("_", "-")


class PluginManager:
    """The plugin host: a pluggy manager plus discovery, provenance and the modality registry.

    Create one with :func:`get_plugin_manager` (entry points + built-ins) or
    directly with ``PluginManager(load_entry_points=False)`` in tests, then
    :meth:`register` plugin objects by hand.
    """

    def __init__(self, *, load_entry_points: bool = True, load_defaults: bool = True) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self._infos: dict[str, PluginInfo] = {}
        self._dist_of: dict[str, tuple[str, str]] = {}
        self._modalities: dict[str, Provided] | None = None
        self._aliases: dict[str, str] = {}
        self._load_entry_points = load_entry_points
        self._entry_points_loaded = False
        if load_defaults:
            for module_name in DEFAULT_PLUGINS:
                module = importlib.import_module(module_name)
                self.register(
                    module,
                    name=module_name.rsplit(".", 1)[-1],
                    distribution=CORE_DISTRIBUTION,
                    version=_dist_version(CORE_DISTRIBUTION),
                )

    # -- registration -------------------------------------------------------

    def register(
        self,
        plugin: object,
        *,
        name: str | None = None,
        distribution: str = "<unregistered>",
        version: str = "",
    ) -> str:
        """Register a plugin object (module or instance with ``@hookimpl`` methods).

        Raises:
            PluginError: the plugin implements a hook with an unknown argument or
                an unknown ``umbrella_`` hook; the message names plugin, hook and signature.
        """
        name = name or getattr(plugin, "__name__", None) or type(plugin).__name__
        try:
            self.pm.register(plugin, name=name)
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"plugin {name!r} ({distribution}) is invalid: {exc}") from exc
        self._dist_of[name] = (distribution, version)
        self._infos[name] = PluginInfo(
            name=name,
            distribution=distribution,
            version=version,
            module=getattr(plugin, "__name__", type(plugin).__module__),
            status="loaded",
        )
        self._modalities = None
        try:
            self.check()
        except PluginError:
            self.pm.unregister(name=name)
            del self._infos[name]
            raise
        return name

    def check(self) -> None:
        """Report hook implementations that match no hook specification.

        pluggy's ``check_pending`` names the hook; this adds the plugin and the
        signature so the author sees what to fix.
        """
        for hook_name in dir(self.pm.hook):
            if not hook_name.startswith("umbrella_"):
                continue
            caller = getattr(self.pm.hook, hook_name)
            if caller.spec is None:
                for impl in caller.get_hookimpls():
                    signature = inspect.signature(impl.function)
                    raise PluginError(
                        f"plugin {impl.plugin_name!r} implements unknown hook "
                        f"{hook_name}{signature}; known hooks: {', '.join(self.hook_names())}"
                    )

    def load_entry_points(self) -> None:
        """Load every plugin registered in the ``umbrella`` entry-point group, once."""
        if self._entry_points_loaded or not self._load_entry_points:
            return
        self._entry_points_loaded = True
        blocked = _split_env(os.environ.get(BLOCK_ENV))
        allowed = _split_env(os.environ.get(ALLOW_ENV))
        for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            dist = ep.dist.name if ep.dist is not None else "<unknown>"
            version = ep.dist.version if ep.dist is not None else ""
            keys = {ep.name.lower(), _normalise_dist(dist)}
            if ep.name in self._infos:
                continue
            if keys & blocked or (allowed and not keys & allowed):
                why = f"blocked by {BLOCK_ENV}" if keys & blocked else f"not in {ALLOW_ENV}"
                self._infos[ep.name] = PluginInfo(
                    name=ep.name,
                    distribution=dist,
                    version=version,
                    module=ep.value,
                    status="blocked",
                    error=why,
                )
                continue
            try:
                plugin = ep.load()
                self.register(plugin, name=ep.name, distribution=dist, version=version)
            except Exception as exc:  # a broken plugin must not take the others down
                self._infos[ep.name] = PluginInfo(
                    name=ep.name,
                    distribution=dist,
                    version=version,
                    module=ep.value,
                    status="broken",
                    error=f"{type(exc).__name__}: {exc}",
                )

    # -- queries --------------------------------------------------------------

    def hook_names(self) -> list[str]:
        return sorted(n for n in dir(hookspecs) if n.startswith("umbrella_"))

    def plugins(self) -> list[PluginInfo]:
        """Every plugin seen: loaded, broken or blocked, with the modalities it provides."""
        self.load_entry_points()
        by_plugin: dict[str, list[str]] = {}
        try:
            for name, provided in self.modality_registry().items():
                by_plugin.setdefault(provided.plugin, []).append(name)
        except PluginError:
            pass  # plugins() must work even when the registry is inconsistent
        out = []
        for name, info in sorted(self._infos.items()):
            hooks: tuple[str, ...] = ()
            if info.status == "loaded":
                plugin = self.pm.get_plugin(name)
                hooks = tuple(sorted(h.name for h in self.pm.get_hookcallers(plugin) or []))
            out.append(attrs.evolve(info, hooks=hooks, modalities=tuple(by_plugin.get(name, ()))))
        return out

    def _impl_results(
        self, hook_name: str, *, call_order: bool = False, **kwargs: Any
    ) -> Iterable[tuple[str, Any]]:
        """Each implementation's result, with its plugin's name.

        An exception inside a hook (other than an UMBRELLA error, which already
        says what is wrong) becomes a PluginError naming the plugin, its
        distribution and the hook. ``call_order``: pluggy's order (tryfirst
        first, later registered first), as first-result hooks are called;
        otherwise registration order.
        """
        caller = getattr(self.pm.hook, hook_name)
        impls = caller.get_hookimpls()
        for impl in reversed(impls) if call_order else impls:
            wanted = {k: v for k, v in kwargs.items() if k in impl.argnames}
            try:
                result = impl.function(**wanted)
            except UmbrellaError:
                raise
            except Exception as exc:
                raise PluginError(
                    f"{self._describe(impl.plugin_name)} failed in {hook_name}: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            yield impl.plugin_name, result

    def _describe(self, plugin_name: str) -> str:
        dist, version = self._dist_of.get(plugin_name, ("<unknown>", ""))
        return f"plugin {plugin_name!r} (distribution {dist} {version}".rstrip() + ")"

    def _set_aside(self, plugin_name: str, error: str) -> None:
        """Mark a registered plugin broken and unregister it (its other hooks go too)."""
        info = self._infos.get(plugin_name)
        if info is not None:
            self._infos[plugin_name] = attrs.evolve(info, status="broken", error=error)
        if self.pm.get_plugin(plugin_name) is not None:
            self.pm.unregister(name=plugin_name)
        self._modalities = None

    def _values(
        self, plugin_name: str, hook_name: str, result: Any, kind: type, check: Callable[[Any], str]
    ) -> list[Any]:
        """An all-results hook's ``result`` as a list of ``kind``; PluginError naming the plugin."""
        if result is None:
            return []
        if isinstance(result, (Mapping, str, bytes)) or not isinstance(result, Iterable):
            raise PluginError(
                f"{self._describe(plugin_name)}: {hook_name} must return a list of "
                f"{kind.__name__} values, got {type(result).__name__}{check(result)}; "
                "fix the plugin or block it with " + BLOCK_ENV
            )
        values = list(result)
        for value in values:
            if not isinstance(value, kind):
                raise PluginError(
                    f"{self._describe(plugin_name)}: {hook_name} must return {kind.__name__} "
                    f"values, got {type(value).__name__}{check(value)}; fix the plugin or "
                    f"block it with {BLOCK_ENV}"
                )
        return values

    def modality_registry(self) -> dict[str, Provided]:
        """Modality name → provided spec, refusing duplicate names and aliases."""
        self.load_entry_points()
        if self._modalities is not None:
            return self._modalities
        registry: dict[str, Provided] = {}
        aliases: dict[str, str] = {}
        caller = self.pm.hook.umbrella_modalities
        results = []
        for impl in caller.get_hookimpls():  # registration order
            plugin_name = impl.plugin_name
            try:
                result = next(iter(self._impl_results_of(impl)))
                specs = self._values(
                    plugin_name, "umbrella_modalities", result, ModalitySpec, _shown
                )
            except UmbrellaError as error:
                # Set it aside so that listing plugins still works, and stop the start-up.
                self._set_aside(plugin_name, str(error))
                raise
            results.append((plugin_name, specs))
        for plugin_name, specs in results:
            dist, version = self._dist_of.get(plugin_name, ("<unknown>", ""))
            for spec in specs:
                for key in (spec.name, *spec.aliases):
                    owner = aliases.get(key)
                    if owner is not None:
                        first = registry[owner]
                        raise DuplicateNameError(
                            f"modality name {key!r} is registered twice: by plugin "
                            f"{first.plugin!r} (distribution {first.distribution} "
                            f"{first.version}) and by plugin {plugin_name!r} (distribution "
                            f"{dist} {version}); uninstall one of them or block it with "
                            f"{BLOCK_ENV}"
                        )
                    aliases[key] = spec.name
                registry[spec.name] = Provided(spec, plugin_name, dist, version)
        self._modalities = registry
        self._aliases = aliases
        return registry

    def _impl_results_of(self, impl: Any) -> Iterable[Any]:
        try:
            yield impl.function()
        except UmbrellaError:
            raise
        except Exception as exc:
            raise PluginError(
                f"{self._describe(impl.plugin_name)} failed in umbrella_modalities: "
                f"{type(exc).__name__}: {exc}"
            ) from exc

    def resolve_modality(self, name: str) -> Provided:
        """Look a modality up by name or alias (case-insensitive)."""
        registry = self.modality_registry()
        key = self._aliases.get(name.strip().lower())
        if key is None:
            known = ", ".join(sorted(registry)) or "none (install a modality plugin)"
            broken = [
                f"{info.name} ({info.distribution}): {info.error}"
                for info in self._infos.values()
                if info.status == "broken"
            ]
            hint = f"; broken plugins: {'; '.join(broken)}" if broken else ""
            raise PluginError(
                f"unknown modality {name!r}; installed modalities: {known}; fix the name or "
                f"install the plugin that provides it{hint}"
            )
        return registry[key]

    def patch_embedder(self, spec: ModalitySpec, hidden_size: int) -> Any:
        """The patch embedder for ``spec`` from the first plugin that provides one.

        Checked before it is used: an ``nn.Module`` whose output for one zero
        input is ``(1, spec.num_tokens, hidden_size)`` (skipped for parameters
        already partitioned by DeepSpeed ZeRO-3). Errors name the plugin.
        """
        self.load_entry_points()
        answers = self._impl_results(
            "umbrella_patch_embedder", call_order=True, spec=spec, hidden_size=hidden_size
        )
        found = next(((name, module) for name, module in answers if module is not None), None)
        if found is None:
            raise PluginError(
                f"no installed plugin provides a patch embedder for {spec.name!r}; install "
                "the plugin of that modality"
            )
        import torch
        import torch.nn as nn

        plugin_name, module = found
        who = self._describe(plugin_name)
        if not isinstance(module, nn.Module):
            raise PluginError(
                f"{who}: umbrella_patch_embedder for {spec.name!r} returned "
                f"{type(module).__name__}, expected torch.nn.Module; fix the plugin"
            )
        params = list(module.parameters())
        if any(hasattr(p, "ds_id") for p in params):
            return module  # partitioned (ZeRO-3): a forward here would need the engine
        device = params[0].device if params else torch.device("cpu")
        dtype = params[0].dtype if params and params[0].is_floating_point() else torch.float32
        expected = (1, spec.num_tokens, hidden_size)
        try:
            with torch.no_grad():
                out = module(torch.zeros((1, *spec.input_shape), device=device, dtype=dtype))
        except Exception as exc:
            raise PluginError(
                f"{who}: the patch embedder for {spec.name!r} fails on an input of shape "
                f"{(1, *spec.input_shape)}: {type(exc).__name__}: {exc}; fix the plugin"
            ) from exc
        shape = tuple(getattr(out, "shape", ()))
        if shape != expected:
            raise PluginError(
                f"{who}: the patch embedder for {spec.name!r} gives output of shape {shape} "
                f"for an input of shape {(1, *spec.input_shape)}, expected {expected} "
                f"(batch, spec.num_tokens, hidden_size); fix the plugin's embedder"
            )
        return module

    def read_study(
        self, location: str, options: Mapping[str, Any] | None = None
    ) -> Iterable[StudyRecord]:
        """Records of the study at ``location`` from the first reader that recognises it."""
        self.load_entry_points()
        records = None
        for _, records in self._impl_results(
            "umbrella_study_reader", call_order=True, location=location, options=dict(options or {})
        ):
            if records is not None:
                break
        if records is None:
            raise PluginError(
                f"no installed study reader recognises {location!r}; give a manifest "
                "(.json/.jsonl) or a folder holding manifest.json(l), or install a study plugin"
            )
        return records

    def loss_terms(self, modalities: Sequence[str], settings: dict[str, Any]) -> list[LossTerm]:
        self.load_entry_points()
        terms: list[LossTerm] = []
        for plugin_name, result in self._impl_results(
            "umbrella_loss_terms", modalities=tuple(modalities), settings=settings
        ):
            terms.extend(self._values(plugin_name, "umbrella_loss_terms", result, LossTerm, _shown))
        return terms

    def metric_families(self, settings: Mapping[str, Any] | None = None) -> list[MetricFamily]:
        """Every plugin's metric families, in the order questions are offered to them.

        pluggy's call order (``tryfirst`` first, then later-registered first,
        the built-in ``trylast`` families last): a family a plugin adds for its
        tasks is asked before the built-in ones.
        """
        self.load_entry_points()
        families: list[MetricFamily] = []
        for plugin_name, result in self._impl_results(
            "umbrella_metrics", call_order=True, settings=dict(settings or {})
        ):
            families.extend(
                self._values(plugin_name, "umbrella_metrics", result, MetricFamily, _shown)
            )
        return families

    def provenance(self, plugin_name: str) -> tuple[str, str]:
        """(distribution, version) of a registered plugin."""
        return self._dist_of.get(plugin_name, ("<unknown>", ""))


def _shown(value: Any) -> str:
    """`` (VALUE)`` for short values, so the author sees what came back."""
    text = repr(value)
    return f" ({text})" if len(text) <= 60 else ""


def _dist_version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        from umbrella_core import __version__

        return __version__


def get_plugin_manager() -> PluginManager:
    """A new manager with the built-ins and every installed entry-point plugin (loaded lazily)."""
    return PluginManager()
