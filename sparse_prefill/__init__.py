"""sparse-prefill: dynamic sparse attention for fast long-context prefill of Hugging Face LMs.

    import sparse_prefill
    handle = sparse_prefill.apply(model, "anchor.yaml")   # sparse prefill, dense decode
    sparse_prefill.remove(model)                          # back to the model's own attention
"""

from sparse_prefill.dispatch import NoCapableExecutorError, select_executor, sparse_attention
from sparse_prefill.integrations.huggingface import SparsePrefillHandle, apply, remove
from sparse_prefill.interfaces import AttentionContext, Executor, Identifier, Parameter, PatternSpec
from sparse_prefill.plan import BlockPlan, DensePlan, Plan, StripePlan
from sparse_prefill.policy import Policy, PolicyError, load_policy, shipped_policies
from sparse_prefill.registry import (
    PatternInfo,
    PluginLoadError,
    available_patterns,
    get_pattern,
    plugin_errors,
    register_plugin,
)

__version__ = "0.1.0"

__all__ = [
    "AttentionContext",
    "BlockPlan",
    "DensePlan",
    "Executor",
    "Identifier",
    "NoCapableExecutorError",
    "Parameter",
    "PatternInfo",
    "PatternSpec",
    "Plan",
    "PluginLoadError",
    "Policy",
    "PolicyError",
    "SparsePrefillHandle",
    "StripePlan",
    "apply",
    "available_patterns",
    "get_pattern",
    "load_policy",
    "plugin_errors",
    "register_plugin",
    "remove",
    "select_executor",
    "shipped_policies",
    "sparse_attention",
]
