"""Hook specifications: the whole contract between sparse-prefill and its plugins.

A plugin is a module (or object) implementing any of these hooks, announced through the
``sparse_prefill.plugins`` entry-point group. The built-in patterns are registered the same way,
so anything a built-in can do, a third-party package can do too.
"""

from __future__ import annotations

import pluggy

from sparse_prefill.interfaces import Executor, PatternSpec

PROJECT = "sparse_prefill"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

__all__ = ["hookimpl", "hookspec", "sparse_prefill_patterns", "sparse_prefill_executors"]


@hookspec
def sparse_prefill_patterns() -> list[PatternSpec]:
    """Return the patterns this plugin provides; names must be unique across all plugins."""


@hookspec
def sparse_prefill_executors() -> list[Executor]:
    """Return executor instances this plugin provides; the dispatcher ranks them by ``priority``."""
