import importlib.metadata
import sys
import types

import pytest
import torch

from sparse_prefill import registry
from sparse_prefill.hookspecs import hookimpl
from sparse_prefill.interfaces import Executor, PatternSpec, write_into
from sparse_prefill.patterns.dense import DenseIdentifier
from sparse_prefill.plan import BlockPlan, DensePlan, StripePlan


@pytest.fixture
def fresh_registry(monkeypatch):
    """A registry loaded anew, so tests can change entry points or environment."""
    monkeypatch.setattr(registry, "_registry", None)
    yield
    registry._registry = None


def test_builtin_and_third_party_patterns_load_through_entry_points(fresh_registry):
    found = {info.name: info for info in registry.available_patterns()}
    for name in ("dense", "streaming", "anchor"):
        assert found[name].distribution == "sparse-prefill"
        assert found[name].plugin == "builtin"
    assert found["local-blocks"].distribution == "sparse-prefill-local-blocks"
    assert registry.plugin_errors() == []


def test_autoload_can_be_switched_off(fresh_registry, monkeypatch):
    monkeypatch.setenv(registry.DISABLE_AUTOLOAD_ENV, "1")
    names = {info.name for info in registry.available_patterns()}
    assert "anchor" in names and "local-blocks" not in names


def test_a_broken_plugin_is_named_and_the_rest_works(fresh_registry, monkeypatch):
    broken = importlib.metadata.EntryPoint("broken-plugin", "no_such_module_xyz", registry.ENTRY_POINT_GROUP)
    real = importlib.metadata.entry_points

    def entry_points(**kwargs):
        return [*real(**kwargs), broken]

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    with pytest.warns(RuntimeWarning, match="broken-plugin"):
        registry.get_registry()
    assert "anchor" in {info.name for info in registry.available_patterns()}
    (error,) = registry.plugin_errors()
    assert "broken-plugin" in str(error) and "no_such_module_xyz" in str(error)


def test_a_plugin_failing_in_its_hook_is_named(fresh_registry):
    class Faulty:
        @hookimpl
        def sparse_prefill_patterns(self):
            raise RuntimeError("boom")

    registry.register_plugin(Faulty(), name="faulty")
    with pytest.warns(RuntimeWarning, match="faulty.*boom"):
        names = {info.name for info in registry.available_patterns()}
    assert "dense" in names


def test_unknown_pattern_lists_what_exists(fresh_registry):
    with pytest.raises(KeyError, match="available: .*anchor"):
        registry.get_pattern("nope")


def test_cli_lists_patterns_with_their_source(fresh_registry, capsys):
    from sparse_prefill.cli import main

    assert main(["patterns"]) == 0
    out = capsys.readouterr().out
    assert "local-blocks" in out and "from sparse-prefill-local-blocks" in out


class _ZeroExecutor(Executor):
    """Claims everything at top priority, so a leftover registration would win every dispatch."""

    name = "test-zeros"
    plan_kinds = (DensePlan, StripePlan, BlockPlan)
    devices = frozenset({"cpu", "cuda"})
    priority = 1000

    def __call__(self, q, k, v, plan, ctx, return_lse=False, out=None):
        return write_into(torch.zeros_like(q), out), None


def _executor_names():
    return {executor.name for executor in registry.get_registry().executors()}


def _pattern_entry_point(monkeypatch, name, pattern):
    """An entry point (of no known distribution, so third-party) whose plugin provides one pattern."""
    module = types.ModuleType(f"test_plugin_{name}")
    module.sparse_prefill_patterns = hookimpl(lambda: [PatternSpec(pattern, f"from {name}", {}, DenseIdentifier)])
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return importlib.metadata.EntryPoint(name, module.__name__, registry.ENTRY_POINT_GROUP)


def test_a_plugin_returning_the_wrong_type_is_named_and_dropped(fresh_registry):
    class WrongTypes:
        @hookimpl
        def sparse_prefill_patterns(self):
            return [PatternSpec("mine", "", {}, DenseIdentifier), {"name": "oops"}]

        @hookimpl
        def sparse_prefill_executors(self):
            return [_ZeroExecutor(), object()]

    registry.register_plugin(WrongTypes(), name="wrong-types")
    with pytest.warns(RuntimeWarning, match=r"wrong-types.*dict.*PatternSpec"):
        names = {info.name for info in registry.available_patterns()}
    assert "anchor" in names and "mine" not in names
    with pytest.warns(RuntimeWarning, match=r"wrong-types.*object.*Executor"):
        executor_names = _executor_names()
    assert "test-zeros" not in executor_names and "reference" in executor_names


@pytest.mark.parametrize("shadow_first", [True, False])
def test_a_builtin_pattern_wins_over_a_third_party_one(fresh_registry, monkeypatch, shadow_first):
    shadow = _pattern_entry_point(monkeypatch, "shadow", "anchor")
    real = importlib.metadata.entry_points

    def entry_points(**kwargs):
        found = list(real(**kwargs))
        return [shadow, *found] if shadow_first else [*found, shadow]

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    with pytest.warns(RuntimeWarning, match=r"^plugin 'shadow'.*'anchor'.*'builtin'"):
        found = {info.name: info for info in registry.available_patterns()}
    assert found["anchor"].plugin == "builtin"
    assert registry.get_pattern("anchor").description != "from shadow"


@pytest.mark.parametrize("order", [("alpha", "zeta"), ("zeta", "alpha")])
def test_between_third_party_plugins_the_winner_does_not_depend_on_discovery_order(
    fresh_registry, monkeypatch, order
):
    plugins = [_pattern_entry_point(monkeypatch, name, "contested") for name in order]
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda **kwargs: plugins)
    with pytest.warns(RuntimeWarning, match=r"^plugin 'zeta'.*'contested'.*'alpha'"):
        assert registry.get_pattern("contested").description == "from alpha"


def test_a_plugin_failing_to_register_leaves_no_hook_behind(fresh_registry):
    class HalfValid:
        @hookimpl
        def sparse_prefill_executors(self):
            return [_ZeroExecutor()]

        @hookimpl
        def sparse_prefill_patterns(self, config):  # not in the hookspec: registration fails here
            return []

    with pytest.warns(RuntimeWarning, match="(?s)half-valid.*config"):
        registry.register_plugin(HalfValid(), name="half-valid")
    assert "test-zeros" not in _executor_names()
    assert not registry.get_registry().manager.has_plugin("half-valid")


def test_a_name_clash_does_not_unregister_the_plugin_already_holding_the_name(fresh_registry):
    class Zeros:
        @hookimpl
        def sparse_prefill_executors(self):
            return [_ZeroExecutor()]

    registry.register_plugin(Zeros(), name="taken")
    with pytest.warns(RuntimeWarning, match="taken"):
        registry.register_plugin(Zeros(), name="taken")
    assert "test-zeros" in _executor_names()


def test_a_failing_executor_hook_is_reported_once(fresh_registry):
    class Failing:
        @hookimpl
        def sparse_prefill_executors(self):
            raise ImportError("needs libfoo.so")

    registry.register_plugin(Failing(), name="failing-exec")
    with pytest.warns(RuntimeWarning, match="failing-exec.*libfoo"):
        _executor_names()
    assert all("reference" in _executor_names() for _ in range(3))
    assert len(registry.plugin_errors()) == 1


def test_the_executor_cache_follows_new_registrations(fresh_registry):
    class Zeros:
        @hookimpl
        def sparse_prefill_executors(self):
            return [_ZeroExecutor()]

    assert "test-zeros" not in _executor_names()
    registry.register_plugin(Zeros(), name="zeros")
    assert "test-zeros" in _executor_names()


def test_a_misspelt_hook_is_named(fresh_registry):
    class Misspelt:
        @hookimpl
        def sparse_prefill_pattern(self):  # the hook is sparse_prefill_patterns
            return [PatternSpec("mine", "", {}, DenseIdentifier)]

    with pytest.warns(RuntimeWarning, match="misspelt.*sparse_prefill_pattern\\b"):
        registry.register_plugin(Misspelt(), name="misspelt")
    (error,) = registry.plugin_errors()
    assert "misspelt" in str(error)
    assert not registry.get_registry().manager.has_plugin("misspelt")


def test_an_optional_hook_without_a_spec_is_accepted(fresh_registry):
    class Forward:
        @hookimpl(optionalhook=True)
        def sparse_prefill_some_future_hook(self):
            return []

    registry.register_plugin(Forward(), name="forward")
    assert registry.plugin_errors() == []
