"""The public API has two layers, each importable and small: users (`sparse_prefill`) and plugin authors
(`sparse_prefill.plugin`)."""

import importlib

import pytest

import sparse_prefill
from sparse_prefill import plugin


@pytest.mark.parametrize("module", [sparse_prefill, plugin], ids=["users", "plugin authors"])
def test_every_exported_name_exists_once(module):
    assert len(module.__all__) == len(set(module.__all__))
    assert [name for name in module.__all__ if not hasattr(module, name)] == []


def test_layers_do_not_overlap_except_run_time_registration():
    assert set(sparse_prefill.__all__) & set(plugin.__all__) == {"register_plugin"}
    assert "select_executor" not in sparse_prefill.__all__  # dispatch internals are no one's API


def test_a_plugin_needs_only_the_plugin_layer():
    """Everything the tutorial's pattern and executor use comes from one module, the same objects as the cores'."""
    interfaces = importlib.import_module("sparse_prefill.interfaces")
    hookspecs = importlib.import_module("sparse_prefill.hookspecs")
    assert plugin.Identifier is interfaces.Identifier and plugin.write_into is interfaces.write_into
    assert plugin.hookimpl is hookspecs.hookimpl
    assert {"Identifier", "Executor", "PatternSpec", "Parameter", "StripePlan", "BlockPlan", "DensePlan",
            "PlanBudgetExceeded", "write_into", "hookimpl"} <= set(plugin.__all__)


def test_names_from_before_the_split_still_import():
    from sparse_prefill import BlockPlan, Identifier, StripePlan, select_executor  # noqa: F401
