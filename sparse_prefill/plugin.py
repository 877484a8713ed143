"""The plugin author's API: everything a pattern or executor package needs, in one import.

    from sparse_prefill.plugin import Identifier, PatternSpec, Parameter, StripePlan, hookimpl

Users who apply policies need only :mod:`sparse_prefill` itself; this layer is for those who add
patterns (an :class:`Identifier` that returns a plan, described by a :class:`PatternSpec`) or
executors (an :class:`Executor` that runs plans), and register them through the
``sparse_prefill.plugins`` entry point with :data:`hookimpl`, or at run time with
:func:`register_plugin`. docs/plugins.md walks through a whole package.
"""

from sparse_prefill.hookspecs import hookimpl
from sparse_prefill.interfaces import (
    AttentionContext,
    Executor,
    HeadValues,
    Identifier,
    Parameter,
    PatternSpec,
    PlanBudgetExceeded,
    write_into,
)
from sparse_prefill.plan import BlockPlan, DensePlan, PendingPlan, Plan, StripePlan
from sparse_prefill.registry import register_plugin

__all__ = [
    "AttentionContext",
    "BlockPlan",
    "DensePlan",
    "Executor",
    "HeadValues",
    "Identifier",
    "Parameter",
    "PatternSpec",
    "PendingPlan",
    "Plan",
    "PlanBudgetExceeded",
    "StripePlan",
    "hookimpl",
    "register_plugin",
    "write_into",
]
