"""The plugin registry: discovers patterns and executors through pluggy and entry points.

Every plugin, built-in or third-party, is an entry point of the ``sparse_prefill.plugins``
group. A plugin that fails to import or register is reported by name (a warning, and listed in
:func:`plugin_errors`); everything else keeps working. Set ``SPARSE_PREFILL_DISABLE_PLUGIN_AUTOLOAD=1``
to load only the plugins shipped with sparse-prefill itself.
"""

from __future__ import annotations

import importlib.metadata
import os
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
        self._sources: dict[str, tuple[str, str]] = {}  # plugin name -> (plugin, distribution)
        self._patterns: dict[str, tuple[PatternSpec, str]] | None = None

    def load_entry_points(self, autoload_third_party: bool = True) -> None:
        for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            distribution = entry_point.dist.name if entry_point.dist is not None else "unknown"
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
        """Register one plugin object or module; a failure is recorded and reported, not raised."""
        try:
            self.manager.register(plugin, name=name)
        except Exception as exc:
            self._record_error(f"plugin {name!r} (from {distribution}) failed to register: {exc}")
            return
        self._sources[name] = (name, distribution)
        self._patterns = None

    def _record_error(self, message: str) -> None:
        error = PluginLoadError(message)
        self.errors.append(error)
        warnings.warn(message, RuntimeWarning, stacklevel=3)

    def _call_per_plugin(self, hook_name: str) -> list[tuple[str, list[Any]]]:
        """Call a hook plugin by plugin, so a failing plugin is named and skipped."""
        results = []
        for impl in getattr(self.manager.hook, hook_name).get_hookimpls():
            try:
                results.append((impl.plugin_name, list(impl.function() or [])))
            except Exception as exc:
                self._record_error(f"plugin {impl.plugin_name!r} failed in {hook_name}: {type(exc).__name__}: {exc}")
        return results

    def patterns(self) -> dict[str, tuple[PatternSpec, str]]:
        """Pattern name -> (spec, providing plugin)."""
        if self._patterns is None:
            found: dict[str, tuple[PatternSpec, str]] = {}
            for plugin_name, specs in self._call_per_plugin("sparse_prefill_patterns"):
                for spec in specs:
                    if spec.name in found:
                        self._record_error(
                            f"plugin {plugin_name!r} registers pattern {spec.name!r}, already provided by "
                            f"plugin {found[spec.name][1]!r}; keeping the first"
                        )
                        continue
                    found[spec.name] = (spec, plugin_name)
            self._patterns = found
        return self._patterns

    def executors(self) -> list[Executor]:
        """All executors, highest priority first."""
        executors = [ex for _, provided in self._call_per_plugin("sparse_prefill_executors") for ex in provided]
        return sorted(executors, key=lambda ex: -ex.priority)

    def source(self, plugin_name: str) -> tuple[str, str]:
        return self._sources.get(plugin_name, (plugin_name, "<runtime>"))


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
