"""Home to the plugin host: discovery, registration, the listing, hook calls that name the plugin.

Plugins are found through the ``umbrella`` entry-point group, loaded lazily and
once per :class:`PluginManager`. A plugin that fails to import is recorded as
broken (``umbrella plugins`` lists it with its error) and does not stop the
others. Two environment variables choose which plugins load, by entry-point
name or distribution name (comma-separated):

* ``UMBRELLA_BLOCK_PLUGINS``: never load these.
* ``UMBRELLA_LOAD_PLUGINS``: load only these (built-ins always load).

A plugin is isolated from the others: one that fails at import or
registration is listed as broken; one whose ``umbrella_modalities`` fails or
returns something else than ModalitySpec values stops the start-up with an
error naming it (plugin, distribution, hook) and is set aside as broken, so
``umbrella plugins`` still lists everything. A patch embedder that is not an
``nn.Module`` or gives the wrong shape, a loss term that is not a LossTerm,
are refused when the model is built, naming the plugin.

The modality registry (names, aliases, duplicates) is
:mod:`umbrella_core.modality_registry`; the check of a patch embedder's output
is :func:`umbrella_core.model.embeddings.probe_embedder`.
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

import umbrella_core.hookspecs as hookspecs
from umbrella_core.errors import DataError, DuplicateNameError, PluginError, UmbrellaError
from umbrella_core.modality_registry import ModalityRegistry, Provided
from umbrella_core.plugin_info import OFFERS as _OFFERS
from umbrella_core.plugin_info import PluginInfo
from umbrella_core.types import (
    Augmentation,
    Baseline,
    Command,
    LossTerm,
    MetricFamily,
    ModalitySpec,
    StudyRecord,
)

__all__ = ["ENTRY_POINT_GROUP", "BLOCK_ENV", "ALLOW_ENV", "PluginManager", "get_plugin_manager"]

ENTRY_POINT_GROUP = "umbrella"
BLOCK_ENV = "UMBRELLA_BLOCK_PLUGINS"
ALLOW_ENV = "UMBRELLA_LOAD_PLUGINS"

#: Built-in plugins, by name: modules using the public hooks as any plugin does. The
#: commands are named, never imported, here: the kernel knows of no application, and a
#: command shipped as a distribution of its own moves from here to its entry point.
# Order matters: of two ``trylast`` readers pluggy asks the earlier registered one first,
# and the BrainVLM reader must see a .json file before the manifest reader does; the
# commands are listed by ``umbrella --help`` in this order.
DEFAULT_PLUGINS = {
    "brainvlm": "umbrella_core.default_plugins.brainvlm",
    "manifest": "umbrella_core.default_plugins.manifest",
    "metrics": "umbrella_core.default_plugins.metrics",
    "embedder": "umbrella_core.default_plugins.embedder",
    "baselines": "umbrella_core.default_plugins.baselines",
    "commands": "umbrella_core.commands.builtin",
    "export": "umbrella_core.export.command",
    "serve": "umbrella_core.serve.command",
    "launch": "umbrella_core.launch.command",
}

CORE_DISTRIBUTION = "umbrella-core"


def _split_env(value: str | None) -> set[str]:
    return {part.strip().lower() for part in (value or "").split(",") if part.strip()}


def _normalise_dist(name: str) -> str:
    return name.lower().replace("_", "-")


class PluginManager:
    """The plugin host: a pluggy manager plus discovery, provenance and the listing.

    Create one with :func:`get_plugin_manager` (entry points + built-ins) or
    directly with ``PluginManager(load_entry_points=False)`` in tests, then
    :meth:`register` plugin objects by hand.
    """

    def __init__(self, *, load_entry_points: bool = True, load_defaults: bool = True) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self._infos: dict[str, PluginInfo] = {}
        self._dist_of: dict[str, tuple[str, str]] = {}
        self._modalities: ModalityRegistry | None = None
        self._load_entry_points = load_entry_points
        self._entry_points_loaded = False
        if load_defaults:
            for plugin_name, module_name in DEFAULT_PLUGINS.items():
                module = importlib.import_module(module_name)
                self.register(
                    module,
                    name=plugin_name,
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
        description: str = "",
    ) -> str:
        """Register a plugin object (module or instance with ``@hookimpl`` methods).

        ``description`` (one line for ``umbrella plugins``) defaults to the first
        line of the plugin's docstring.

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
            description=description or _first_line(inspect.getdoc(plugin)),
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
        eps = sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name)
        names = {ep.name.lower() for ep in eps}
        names |= {_normalise_dist(ep.dist.name) for ep in eps if ep.dist is not None}
        built_in = {*DEFAULT_PLUGINS, CORE_DISTRIBUTION}
        if blocked & built_in:
            raise PluginError(
                f"{BLOCK_ENV}: {', '.join(map(repr, sorted(blocked & built_in)))} "
                f"{'is' if len(blocked & built_in) == 1 else 'are'} built into "
                f"{CORE_DISTRIBUTION} and always loaded; block installed plugins only"
            )
        # A built-in named in the allow list is allowed: it is loaded in any case.
        restricted, allowed = bool(allowed), allowed - built_in
        for variable, wanted in ((BLOCK_ENV, blocked), (ALLOW_ENV, allowed)):
            unknown = sorted(wanted - names)
            if unknown:
                # A misspelt name would otherwise filter nothing (or everything) silently.
                raise PluginError(
                    f"{variable}: no installed plugin is named {', '.join(map(repr, unknown))}; "
                    f"installed: {', '.join(sorted(ep.name for ep in eps)) or 'none'} "
                    "(plugin or distribution names)"
                )
        for ep in eps:
            if ep.name in self._infos:
                continue
            dist = ep.dist.name if ep.dist is not None else "<unknown>"
            version = ep.dist.version if ep.dist is not None else ""
            summary = _summary(ep.dist)
            unloaded = PluginInfo(ep.name, dist, version, ep.value, "blocked", description=summary)
            keys = {ep.name.lower(), _normalise_dist(dist)}
            if keys & blocked or (restricted and not keys & allowed):
                why = f"blocked by {BLOCK_ENV}" if keys & blocked else f"not in {ALLOW_ENV}"
                self._infos[ep.name] = attrs.evolve(unloaded, error=why)
                continue
            try:
                plugin = ep.load()
                self.register(
                    plugin, name=ep.name, distribution=dist, version=version, description=summary
                )
            except Exception as exc:  # a broken plugin must not take the others down
                error = f"{type(exc).__name__}: {exc}"
                self._infos[ep.name] = attrs.evolve(unloaded, status="broken", error=error)

    # -- queries --------------------------------------------------------------

    def hook_names(self) -> list[str]:
        return sorted(n for n in dir(hookspecs) if n.startswith("umbrella_"))

    def plugins(self) -> list[PluginInfo]:
        """Every plugin seen (loaded, broken or blocked) and what each offers by name.

        Works even when the modality registry is inconsistent (a duplicate
        name): the listing is how a user finds out. A hook that fails while
        listing is shown as the plugin's error.
        """
        self.load_entry_points()
        try:
            registry = self._registry().by_name
        except PluginError:
            registry = {}
        offers: dict[str, dict[str, Any]] = {}
        for name, provided in registry.items():
            offers.setdefault(provided.plugin, {}).setdefault("modalities", []).append(name)
        for field, (hook_name, kind, name_of) in _OFFERS.items():
            kwargs = {"modalities": tuple(sorted(registry)), "settings": {}}
            for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                found = offers.setdefault(impl.plugin_name, {})
                try:
                    result = self._call(impl, hook_name, kwargs)
                    values = self._values(impl.plugin_name, hook_name, result, kind, _shown)
                except UmbrellaError as error:
                    found["error"] = str(error)
                    continue
                found[field] = [name_of(value) for value in values]
        out = []
        for name, info in sorted(self._infos.items()):
            if info.status == "loaded":
                plugin = self.pm.get_plugin(name)
                hooks = sorted(h.name for h in self.pm.get_hookcallers(plugin) or [])
                found = offers.get(name, {})
                failed = found.pop("error", None)
                offered: dict[str, Any] = {field: tuple(values) for field, values in found.items()}
                info = attrs.evolve(info, hooks=tuple(hooks), error=failed, **offered)
            out.append(info)
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
        self.load_entry_points()
        caller = getattr(self.pm.hook, hook_name)
        impls = caller.get_hookimpls()
        for impl in reversed(impls) if call_order else impls:
            yield impl.plugin_name, self._call(impl, hook_name, kwargs)

    def _call(self, impl: Any, hook_name: str, kwargs: Mapping[str, Any]) -> Any:
        """One implementation's result, given the arguments it asks for; errors name it."""
        wanted = {k: v for k, v in kwargs.items() if k in impl.argnames}
        try:
            return impl.function(**wanted)
        except UmbrellaError:
            raise
        except Exception as exc:
            raise PluginError(
                f"{self._describe(impl.plugin_name)} failed in {hook_name}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc

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
        return self._registry().by_name

    def _registry(self) -> ModalityRegistry:
        self.load_entry_points()
        if self._modalities is None:
            provided = []
            for impl in self.pm.hook.umbrella_modalities.get_hookimpls():  # registration order
                name = impl.plugin_name
                try:
                    result = self._call(impl, "umbrella_modalities", {})
                    specs = self._values(name, "umbrella_modalities", result, ModalitySpec, _shown)
                except UmbrellaError as error:
                    # Set it aside so that listing plugins still works, and stop the start-up.
                    self._set_aside(name, str(error))
                    raise
                dist, version = self._dist_of.get(name, ("<unknown>", ""))
                provided += [Provided(spec, name, dist, version) for spec in specs]
            self._modalities = ModalityRegistry.from_provided(
                provided, remedy=f"uninstall one of them or block it with {BLOCK_ENV}"
            )
        return self._modalities

    def resolve_modality(self, name: str) -> Provided:
        """Look a modality up by name or alias (case-insensitive); a miss names broken plugins."""
        registry = self._registry()
        # A plugin that is installed but broken or filtered out is the likelier
        # reason than a missing install: name it.
        broken = [
            f"{info.name} ({info.distribution}): {info.error}"
            for info in self._infos.values()
            if info.status in ("broken", "blocked")
        ]
        return registry.resolve(name, broken=broken)

    def patch_embedder(self, spec: ModalitySpec, hidden_size: int) -> Any:
        """The patch embedder for ``spec`` from the first plugin that gives one, probed.

        Asked in pluggy's call order: a plugin's own embedder before the built-in
        (``trylast``). Checked by :func:`~umbrella_core.model.embeddings.probe_embedder`.
        """
        answers = self._impl_results(
            "umbrella_patch_embedder", call_order=True, spec=spec, hidden_size=hidden_size
        )
        found = next(((name, module) for name, module in answers if module is not None), None)
        if found is None:
            raise PluginError(
                f"no installed plugin provides a patch embedder for {spec.name!r}; install "
                "the plugin of that modality"
            )
        from umbrella_core.model.embeddings import probe_embedder

        plugin_name, module = found
        return probe_embedder(module, spec, hidden_size, who=self._describe(plugin_name))

    def read_study(
        self,
        location: str,
        options: Mapping[str, Any] | None = None,
        on_error: Callable[[DataError], None] | None = None,
    ) -> Iterable[StudyRecord]:
        """Records of the study at ``location`` from the first reader that recognises it.

        ``on_error`` receives each record the reader cannot use, and reading
        goes on; without it the first such record raises.
        """
        records = None
        for _, records in self._impl_results(
            "umbrella_study_reader",
            call_order=True,
            location=location,
            options=dict(options or {}),
            on_error=on_error or _raise,
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
        return self._collect(
            "umbrella_loss_terms", LossTerm, modalities=tuple(modalities), settings=settings
        )

    def metric_families(self, settings: Mapping[str, Any] | None = None) -> list[MetricFamily]:
        """Every plugin's metric families, in the order questions are offered to them.

        pluggy's call order (``tryfirst`` first, then later-registered first,
        the built-in ``trylast`` families last): a family a plugin adds for its
        tasks is asked before the built-in ones.
        """
        return self._collect(
            "umbrella_metrics", MetricFamily, call_order=True, settings=dict(settings or {})
        )

    def augmentations(self) -> dict[str, Augmentation]:
        """Every plugin's augmentations by name; a name two plugins give is refused."""
        found: dict[str, tuple[str, Augmentation]] = {}
        for plugin, result in self._impl_results("umbrella_augmentations"):
            for value in self._values(
                plugin, "umbrella_augmentations", result, Augmentation, _shown
            ):
                other = found.setdefault(value.name, (plugin, value))[0]
                if other != plugin:
                    raise DuplicateNameError(
                        f"augmentation {value.name!r} is offered by {self._describe(other)} "
                        f"and by {self._describe(plugin)}; uninstall or block one ({BLOCK_ENV})"
                    )
        return {name: value for name, (_, value) in found.items()}

    def baselines(self) -> list[Provided]:
        """Every plugin's baselines, in the order a question's images are offered to them.

        pluggy's call order (``tryfirst`` first, then later-registered first,
        the built-in ``regional`` baseline, ``trylast``, last), each with the
        plugin that gives it (:class:`Provided`), so that a bad feature vector
        names it. A name two plugins give is refused, naming both.
        """
        found: dict[str, Provided] = {}
        for plugin, result in self._impl_results("umbrella_baselines", call_order=True):
            for value in self._values(plugin, "umbrella_baselines", result, Baseline, _shown):
                other = found.get(value.name)
                if other is not None and other.plugin != plugin:
                    raise DuplicateNameError(
                        f"baseline {value.name!r} is offered by {self._describe(other.plugin)} "
                        f"and by {self._describe(plugin)}; uninstall or block one ({BLOCK_ENV})"
                    )
                dist, version = self._dist_of.get(plugin, ("<unknown>", ""))
                found.setdefault(value.name, Provided(value, plugin, dist, version))
        return list(found.values())

    def commands(self) -> list[Provided]:
        """Every plugin's commands (:class:`Command`), each with the plugin that gives it.

        In registration order: the core's own first. A plugin whose hook fails or
        gives a name already taken is set aside with the reason (``umbrella
        plugins`` shows it), so that one broken plugin leaves every other command
        working, ``umbrella plugins`` included.
        """
        found: dict[str, Provided] = {}
        for impl in self._hookimpls("umbrella_commands"):
            plugin = impl.plugin_name
            try:
                result = self._call(impl, "umbrella_commands", {})
                values = self._values(plugin, "umbrella_commands", result, Command, _shown)
                taken = [v.name for v in values if v.name in found]
                if taken:
                    other = found[taken[0]].plugin
                    raise DuplicateNameError(
                        f"command {taken[0]!r} is offered by {self._describe(other)} and by "
                        f"{self._describe(plugin)}; uninstall or block one ({BLOCK_ENV})"
                    )
            except UmbrellaError as error:
                self._set_aside(plugin, str(error))
                continue
            dist, version = self._dist_of.get(plugin, ("<unknown>", ""))
            for value in values:
                found[value.name] = Provided(value, plugin, dist, version)
        return list(found.values())

    def _hookimpls(self, hook_name: str) -> list[Any]:
        """A hook's implementations in registration order, entry points loaded."""
        self.load_entry_points()
        return list(getattr(self.pm.hook, hook_name).get_hookimpls())

    def _collect(self, hook_name: str, kind: type, **kwargs: Any) -> list[Any]:
        out: list[Any] = []
        for plugin_name, result in self._impl_results(hook_name, **kwargs):
            out.extend(self._values(plugin_name, hook_name, result, kind, _shown))
        return out


def _raise(error: DataError) -> None:
    raise error


def _shown(value: Any) -> str:
    """`` (VALUE)`` for short values, so the author sees what came back."""
    text = repr(value)
    return f" ({text})" if len(text) <= 60 else ""


def _first_line(text: str | None) -> str:
    return (text or "").strip().split("\n", 1)[0].strip()


def _summary(dist: Any) -> str:
    """The distribution's one-line Summary; "" when it has none (or no metadata)."""
    meta = getattr(dist, "metadata", None)
    summary = _first_line(meta.get("Summary") if meta is not None else None)
    return "" if summary == "UNKNOWN" else summary


def _dist_version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        from umbrella_core.constants import CORE_VERSION

        return CORE_VERSION


def get_plugin_manager() -> PluginManager:
    """A new manager with the built-ins and every installed entry-point plugin (loaded lazily)."""
    return PluginManager()
