"""The plugin registry: discovers patterns and executors through pluggy and entry points.

Every plugin, built-in or third-party, is an entry point of the ``sparse_prefill.plugins``
group. A plugin that fails to import or register, or whose hook fails or returns objects breaking
the executor or pattern contract (checked when collected, so dispatch never trips on them), is
reported by name (a warning, and listed in :func:`plugin_errors`, each failure once); everything
else keeps working. Set ``SPARSE_PREFILL_DISABLE_PLUGIN_AUTOLOAD=1`` to load only the plugins
shipped with sparse-prefill itself.
"""

from __future__ import annotations

import importlib.metadata
import os
import reprlib
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import pluggy
import torch

from sparse_prefill import hookspecs
from sparse_prefill.interfaces import Executor, Parameter, PatternSpec

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
        # What each plugin's hook returned (None: it failed, reported), kept across registrations so a
        # recomputation neither calls old hooks again nor reports their failures twice.
        self._provided: dict[pluggy.HookImpl, list[Any] | None] = {}
        self._reported_conflicts: set[tuple[str, str]] = set()  # (pattern name, plugin that lost it)
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
        if (problem := self._not_a_plugin(plugin)) is not None:
            self._record_error(f"plugin {name!r} (from {distribution}) failed to register: {problem}")
            return
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

    def _not_a_plugin(self, plugin: Any) -> str | None:
        """Why ``plugin`` is no plugin at all (it implements no hook: ``42``, a module missing its
        ``@hookimpl`` markers), or None; pluggy would register such an object silently, and it does nothing."""
        try:
            if any(self.manager.parse_hookimpl_opts(plugin, attr) is not None for attr in dir(plugin)):
                return None
        except Exception:  # an attribute that cannot be read: pluggy's register fails on it too, and says why
            return None
        return (f"{reprlib.repr(plugin)} ({type(plugin).__name__}) implements no sparse_prefill hook; a plugin is a "
                f"module or object with at least one of the functions {', '.join(self._known_hooks())} marked "
                f"@sparse_prefill.hookspecs.hookimpl")

    def _known_hooks(self) -> list[str]:
        return sorted(name for name, caller in vars(self.manager.hook).items() if caller.has_spec())

    def _check_hook_names(self, plugin: Any) -> None:
        """Raise for a hookimpl matching no hookspec: pluggy accepts a misspelt hook and never calls it."""
        unknown = sorted(
            caller.name
            for caller in self.manager.get_hookcallers(plugin) or []
            if not caller.has_spec()
            and any(impl.plugin is plugin and not impl.optionalhook for impl in caller.get_hookimpls())
        )
        if unknown:
            raise pluggy.PluginValidationError(
                plugin, f"unknown hook(s) {', '.join(unknown)}; the hooks are {', '.join(self._known_hooks())}"
            )

    def _record_error(self, message: str) -> None:
        error = PluginLoadError(message)
        self.errors.append(error)
        warnings.warn(message, RuntimeWarning, stacklevel=3)

    def _call_per_plugin(self, hook_name: str, expected: type, contract: _Contract) -> list[tuple[str, list[Any]]]:
        """Each plugin's results of a hook, in :meth:`_precedence` order; a plugin whose hook fails or
        returns an unusable item is named and skipped instead of breaking every later call.

        A hook is called once per plugin: later calls reuse its result, so a failure is reported once.
        """
        results = []
        impls = getattr(self.manager.hook, hook_name).get_hookimpls()
        for impl in sorted(impls, key=lambda impl: self._precedence(impl.plugin_name)):
            if impl not in self._provided:
                self._provided[impl] = self._collect(impl, hook_name, expected, contract)
            if (provided := self._provided[impl]) is not None:
                results.append((impl.plugin_name, provided))
        return results

    def _collect(self, impl: pluggy.HookImpl, hook_name: str, expected: type, contract: _Contract) -> list[Any] | None:
        """What one plugin's hook returns, checked item by item, or None (recorded) if anything is unusable.

        One bad item discards all the plugin returned from that hook (as for a wrong type): it is a
        broken plugin, and serving half of it would hide that. Other plugins are unaffected.
        """
        where = f"plugin {impl.plugin_name!r}"
        try:
            provided = list(impl.function() or [])
        except Exception as exc:
            self._record_error(f"{where} failed in {hook_name}: {type(exc).__name__}: {exc}")
            return None
        for item in provided:
            if not isinstance(item, expected):
                self._record_error(f"{where} returned {reprlib.repr(item)} ({type(item).__name__}) from {hook_name}, "
                                   f"expected {expected.__name__} instances; ignoring all it returned there")
                return None
        for item in provided:
            if problems := _contract_problems(item, contract):
                self._record_error(f"{where} returned an unusable {type(item).__qualname__} from {hook_name}: "
                                   f"{'; '.join(problems)}; ignoring all it returned there")
                return None
        return provided

    def _precedence(self, plugin_name: str) -> tuple[bool, int]:
        """Which plugin wins a conflict: built-in ones first, then the one registered first."""
        return self.source(plugin_name)[1] != OWN_DISTRIBUTION, list(self._sources).index(plugin_name)

    def patterns(self) -> dict[str, tuple[PatternSpec, str]]:
        """Pattern name -> (spec, providing plugin)."""
        if self._patterns is None:
            found: dict[str, tuple[PatternSpec, str]] = {}
            provided = self._call_per_plugin("sparse_prefill_patterns", PatternSpec, _PATTERN_CONTRACT)
            for plugin_name, specs in provided:
                for spec in specs:
                    if spec.name in found:
                        if (spec.name, plugin_name) not in self._reported_conflicts:  # a recomputation finds it again
                            self._reported_conflicts.add((spec.name, plugin_name))
                            self._report_conflict(spec.name, found[spec.name][1], plugin_name)
                        continue
                    found[spec.name] = (spec, plugin_name)
            self._patterns = found
        return self._patterns

    def _report_conflict(self, pattern: str, kept: str, ignored: str) -> None:
        rule = ("built-in patterns always win" if self.source(kept)[1] == OWN_DISTRIBUTION
                else "the plugin registered first wins; entry points register by distribution name")
        self._record_error(f"plugin {ignored!r} registers pattern {pattern!r}, already provided by "
                           f"plugin {kept!r}; the one from plugin {ignored!r} is ignored ({rule})")

    def executors(self) -> list[Executor]:
        """All executors, highest priority first; cached like :meth:`patterns`, so a failing plugin is
        reported once rather than on every attention call."""
        if self._executors is None:
            provided = self._call_per_plugin("sparse_prefill_executors", Executor, _EXECUTOR_CONTRACT)
            self._executors = sorted((ex for _, executors in provided for ex in executors), key=lambda ex: -ex.priority)
        return self._executors

    def source(self, plugin_name: str) -> tuple[str, str]:
        return self._sources.get(plugin_name, (plugin_name, "<runtime>"))


# What the registry and dispatcher read from a plugin's objects: (attribute, test, what it must be).
_Contract = tuple[tuple[str, Callable[[Any], bool], str], ...]
_MISSING = object()


def _set_of(kind: type) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, (set, frozenset)) and all(
        isinstance(item, kind) and not isinstance(item, bool) for item in value)


def _parameters_ok(value: Any) -> bool:
    return isinstance(value, Mapping) and all(isinstance(k, str) and isinstance(p, Parameter) for k, p in value.items())


def _non_empty_str(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


_EXECUTOR_CONTRACT: _Contract = (
    ("name", _non_empty_str, "a non-empty str (dispatch errors name executors by it)"),
    ("plan_kinds", lambda v: isinstance(v, tuple) and bool(v) and all(isinstance(k, type) for k in v),
     "a non-empty tuple of plan classes"),
    ("devices", _set_of(str), "a set or frozenset of device types (str, e.g. 'cuda')"),
    ("dtypes", _set_of(torch.dtype), "a set or frozenset of torch.dtype"),
    ("head_dims", lambda v: v is None or _set_of(int)(v), "None (any head dim) or a set or frozenset of int"),
    ("priority", lambda v: isinstance(v, int) and not isinstance(v, bool), "an int"),
    ("not_supported_reasons", callable, "a method returning a list of str"),
    ("__call__", lambda v: callable(v) and not getattr(v, "__isabstractmethod__", False),
     "an implementation of Executor.__call__"),
)
_PATTERN_CONTRACT: _Contract = (
    ("name", _non_empty_str, "a non-empty str (policies select patterns by it)"),
    ("description", lambda v: isinstance(v, str), "a str"),
    ("parameters", _parameters_ok, "a mapping of parameter names (str) to Parameter"),
    ("make_identifier", callable, "a callable returning an Identifier (usually the Identifier subclass)"),
)


def _contract_problems(item: Any, contract: _Contract) -> list[str]:
    """Each attribute of ``item`` that breaks ``contract``: what it is, and what it must be."""
    problems = []
    for attribute, test, wanted in contract:
        try:
            value = getattr(item, attribute, _MISSING)
            if value is not _MISSING and test(value):
                continue
            got = "missing" if value is _MISSING else f"{reprlib.repr(value)} ({type(value).__name__})"
        except Exception as exc:  # a property that raises is as unusable as a missing attribute
            got = f"unreadable ({type(exc).__name__}: {exc})"
        problems.append(f"{attribute} is {got}, must be {wanted}")
    return problems


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
    """Register a plugin at run time (a module or object implementing the hooks).

    Raises TypeError for an object implementing no hook (``42``, a module without ``@hookimpl``
    markers): this is a direct call, so the mistake is reported where it is made. A plugin that is
    one but fails to register (a misspelt hook, a name already taken) is recorded in
    :func:`plugin_errors` with a RuntimeWarning, like an entry-point plugin; entry-point plugins
    that are no plugin are recorded too, never raised.
    """
    registry = get_registry()
    if (problem := registry._not_a_plugin(plugin)) is not None:
        raise TypeError(f"register_plugin: {problem}")
    registry.register(plugin, name=name or getattr(plugin, "__name__", repr(plugin)))


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
