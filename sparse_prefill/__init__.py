"""sparse-prefill: dynamic sparse attention for fast long-context prefill of Hugging Face LMs.

    import sparse_prefill
    handle = sparse_prefill.apply(model, "anchor.yaml")   # sparse prefill, dense decode
    sparse_prefill.remove(model)                          # back to the model's own attention
"""

import os as _os

# kernels/ and patterns/ sit at the repository root (the layout our users asked for) and install as
# sparse_prefill.kernels and sparse_prefill.patterns. They have no __init__.py, so Python started in
# the root never takes them for Hugging Face's `kernels` or any other installed distribution: a
# regular package anywhere on sys.path wins over a folder without one. setuptools' editable finder
# cannot map such a folder, so in a source checkout the root joins this package's search path; a
# wheel carries both folders inside the package and needs nothing.
_CHECKOUT_ROOT = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(__path__[0], "kernels")) and _os.path.isdir(_os.path.join(_CHECKOUT_ROOT, "kernels")):
    __path__.append(_CHECKOUT_ROOT)

from sparse_prefill.dispatch import NoCapableExecutorError, sparse_attention
from sparse_prefill.guard import ErrorGuard
from sparse_prefill.dispatch import select_executor  # noqa: F401  (importable as before; not the users' API)
from sparse_prefill.integrations.huggingface import SparsePrefillHandle, apply, remove
# Plugin authors' names, importable from here as before sparse_prefill.plugin existed:
from sparse_prefill.interfaces import AttentionContext, Executor, Identifier, Parameter, PatternSpec  # noqa: F401
from sparse_prefill.plan import BlockPlan, DensePlan, Plan, StripePlan  # noqa: F401
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

# The user's API. Plugin authors import from sparse_prefill.plugin (roles, plans, hook marker); those names
# stay importable from here too, for code written before the split, but are not part of this layer.
__all__ = [
    "ErrorGuard",
    "NoCapableExecutorError",
    "PatternInfo",
    "PluginLoadError",
    "Policy",
    "PolicyError",
    "SparsePrefillHandle",
    "apply",
    "available_patterns",
    "get_pattern",
    "load_policy",
    "plugin_errors",
    "register_plugin",
    "remove",
    "shipped_policies",
    "sparse_attention",
]
