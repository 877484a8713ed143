"""The plugin registry: discovers patterns and executors through pluggy and entry points.

Every plugin, built-in or third-party, is an entry point of the ``sparse_prefill.plugins``
group. A plugin that fails to import or register is reported by name (a warning, and listed in
:func:`plugin_errors`); everything else keeps working. Set ``SPARSE_PREFILL_DISABLE_PLUGIN_AUTOLOAD=1``
to load only the plugins shipped with sparse-prefill itself.
"""

from __future__ import annotations

import importlib.metadata
import os
import reprlib
import warnings
from dataclasses import dataclass
from typing import Any

import pluggy

from sparse_prefill import hookspecs
from sparse_prefill.interfaces import Executor, PatternSpec

ENTRY_POINT_GROUP = "sparse_prefill.plugins"
DISABLE_AUTOLOAD_ENV = "SPARSE_PREFILL_DISABLE_PLUGIN_AUTOLOAD"
OWN_DISTRIBUTION = "sparse-prefill"

__all__ = [
    "PatternInfo",
    "PluginLoadError",
    "Registry",
    "available_patterns",
    "get_pattern",
    "get_registry",
    "plugin_errors",
    "register_plugin",
]


class PluginLoadError(RuntimeError):
    """A plugin could not be imported or registered; the message names it."""


@dataclass(frozen=True)
class PatternInfo:
    """A pattern as :func:`available_patterns` lists it: what it is and where it came from."""

    name: str
    description: str
    plugin: str
    distribution: str


class Registry:
    """Holds the plugin manager and the patterns and executors its plugins provide."""

    def __init__(self) -> None:
        self.manager = pluggy.PluginManager(hookspecs.PROJECT)
        self.manager.add_hookspecs(hookspecs)
        self.errors: list[PluginLoadError] = []
        self._sources: dict[str, tuple[str, str]] = {}  # plugin name -> (plugin, distribution), in registration order
        self._patterns: dict[str, tuple[PatternSpec, str]] | None = None
        self._executors: list[Executor] | None = None

    def load_entry_points(self, autoload_third_party: bool = True) -> None:
        """Register every plugin entry point, sparse-prefill's own first and the rest by distribution and name,
        so which third-party plugin wins a pattern-name conflict does not depend on discovery (sys.path) order."""
        for entry_point in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=_load_order):
            distribution = _distribution(entry_point)
            if not autoload_third_party and distribution != OWN_DISTRIBUTION:
                continue
            try:
                plugin = entry_point.load()
            except Exception as exc:  # any import failure must not take the library down
                self._record_error(f"plugin {entry_point.name!r} ({entry_point.value}, from {distribution}) "
                                   f"failed to import: {type(exc).__name__}: {exc}")
                continue
            self.register(plugin, name=entry_point.name, distribution=distribution)

    def register(self, plugin: Any, name: str, distribution: str = "<runtime>") -> None:
        """Register one plugin object or module; a failure is recorded and reported, not raised.

        A failed plugin is removed entirely: pluggy keeps the hooks it added before failing, and a
        half-registered plugin would keep serving (say) its executor while reported as failed.
        """
        already_registered = self.manager.has_plugin(name) or self.manager.is_registered(plugin)
        try:
            self.manager.register(plugin, name=name)
            self._check_hook_names(plugin)
        except Exception as exc:
            if not already_registered:  # else pluggy refused before changing anything: keep the registered one
                self.manager.unregister(plugin, name=name)
            self._record_error(f"plugin {name!r} (from {distribution}) failed to register: {exc}")
        else:
            self._sources[name] = (name, distribution)
        self._patterns = self._executors = None

    def _check_hook_names(self, plugin: Any) -> None:
        """Raise for a hookimpl matching no hookspec: pluggy accepts a misspelt hook and never calls it."""
        unknown = sorted(
            caller.name
            for caller in self.manager.get_hookcallers(plugin) or []
            if not caller.has_spec()
            and any(impl.plugin is plugin and not impl.optionalhook for impl in caller.get_hookimpls())
        )
        if unknown:
            known = sorted(name for name, caller in vars(self.manager.hook).items() if caller.has_spec())
            raise pluggy.PluginValidationError(
                plugin, f"unknown hook(s) {', '.join(unknown)}; the hooks are {', '.join(known)}"
            )

    def _record_error(self, message: str) -> None:
        error = PluginLoadError(message)
        self.errors.append(error)
        warnings.warn(message, RuntimeWarning, stacklevel=3)

    def _call_per_plugin(self, hook_name: str, expected: type) -> list[tuple[str, list[Any]]]:
        """Call a hook plugin by plugin, in :meth:`_precedence` order, so a plugin that fails or returns
        something other than ``expected`` instances is named and skipped instead of breaking every later call."""
        results = []
        impls = getattr(self.manager.hook, hook_name).get_hookimpls()
        for impl in sorted(impls, key=lambda impl: self._precedence(impl.plugin_name)):
            try:
                provided = list(impl.function() or [])
            except Exception as exc:
                self._record_error(f"plugin {impl.plugin_name!r} failed in {hook_name}: {type(exc).__name__}: {exc}")
                continue
            wrong = [item for item in provided if not isinstance(item, expected)]
            if wrong:
                self._record_error(
                    f"plugin {impl.plugin_name!r} returned {reprlib.repr(wrong[0])} ({type(wrong[0]).__name__}) from "
                    f"{hook_name}, expected {expected.__name__} instances; ignoring all it returned there"
                )
                continue
            results.append((impl.plugin_name, provided))
        return results

    def _precedence(self, plugin_name: str) -> tuple[bool, int]:
        """Which plugin wins a conflict: built-in ones first, then the one registered first."""
        return self.source(plugin_name)[1] != OWN_DISTRIBUTION, list(self._sources).index(plugin_name)

    def patterns(self) -> dict[str, tuple[PatternSpec, str]]:
        """Pattern name -> (spec, providing plugin)."""
        if self._patterns is None:
            found: dict[str, tuple[PatternSpec, str]] = {}
            for plugin_name, specs in self._call_per_plugin("sparse_prefill_patterns", PatternSpec):
                for spec in specs:
                    if spec.name in found:
                        kept = found[spec.name][1]
                        rule = ("built-in patterns always win" if self.source(kept)[1] == OWN_DISTRIBUTION
                                else "the plugin registered first wins; entry points register by distribution name")
                        self._record_error(
                            f"plugin {plugin_name!r} registers pattern {spec.name!r}, already provided by "
                            f"plugin {kept!r}; the one from plugin {plugin_name!r} is ignored ({rule})"
                        )
                        continue
                    found[spec.name] = (spec, plugin_name)
            self._patterns = found
        return self._patterns

    def executors(self) -> list[Executor]:
        """All executors, highest priority first; cached like :meth:`patterns`, so a failing plugin is
        reported once rather than on every attention call."""
        if self._executors is None:
            provided = self._call_per_plugin("sparse_prefill_executors", Executor)
            self._executors = sorted((ex for _, executors in provided for ex in executors), key=lambda ex: -ex.priority)
        return self._executors

    def source(self, plugin_name: str) -> tuple[str, str]:
        return self._sources.get(plugin_name, (plugin_name, "<runtime>"))


def _distribution(entry_point: importlib.metadata.EntryPoint) -> str:
    """The distribution shipping an entry point; one built by hand (as tests do) counts as third-party."""
    return entry_point.dist.name if entry_point.dist is not None else "unknown"


def _load_order(entry_point: importlib.metadata.EntryPoint) -> tuple[bool, str, str]:
    """sparse-prefill's own plugins first, then the others by distribution and entry-point name."""
    distribution = _distribution(entry_point)
    return distribution != OWN_DISTRIBUTION, distribution, entry_point.name


_registry: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, loaded from entry points on first use."""
    global _registry
    if _registry is None:
        registry = Registry()
        registry.load_entry_points(autoload_third_party=os.environ.get(DISABLE_AUTOLOAD_ENV, "") in ("", "0"))
        _registry = registry
    return _registry


def register_plugin(plugin: Any, name: str | None = None) -> None:
    """Register a plugin at run time (a module or object implementing the hooks)."""
    get_registry().register(plugin, name=name or getattr(plugin, "__name__", repr(plugin)))


def available_patterns() -> list[PatternInfo]:
    """Every registered pattern with the plugin and distribution it came from."""
    registry = get_registry()
    return [
        PatternInfo(name, spec.description, plugin, registry.source(plugin)[1])
        for name, (spec, plugin) in sorted(registry.patterns().items())
    ]


def get_pattern(name: str) -> PatternSpec:
    """The pattern registered under ``name``, or a KeyError listing what exists."""
    found = get_registry().patterns()
    if name not in found:
        raise KeyError(f"unknown pattern {name!r}; available: {', '.join(sorted(found)) or 'none'}")
    return found[name][0]


def plugin_errors() -> list[PluginLoadError]:
    """Plugins that failed to load or register, in the order they failed."""
    return list(get_registry().errors)
