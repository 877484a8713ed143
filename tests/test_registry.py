import dataclasses
import importlib.metadata
import sys
import types
import warnings

import pytest
import torch

from sparse_prefill import registry
from sparse_prefill.hookspecs import hookimpl
from sparse_prefill.interfaces import Executor, Parameter, PatternSpec, write_into
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


class _Declining(Executor):
    """Valid except for ``name`` (left to each test): it outranks every built-in executor and declines
    every input, so select_executor reads its name for the refusal list on every dispatch."""

    plan_kinds = (DensePlan, StripePlan, BlockPlan)
    devices = frozenset({"no-such-device"})
    priority = 10_000

    def __call__(self, q, k, v, plan, ctx, return_lse=False, out=None):
        raise AssertionError("declines everything, never runs")


class _Bystander(_ZeroExecutor):
    """A valid executor that never wins (lowest priority): shows its plugin keeps working."""

    name = "test-bystander"
    priority = -1000


def _executor_plugin(*executors):
    class Plugin:
        @hookimpl
        def sparse_prefill_executors(self):
            return list(executors)

    return Plugin()


def _anchor_dispatch_matches_the_reference():
    from sparse_prefill.dispatch import sparse_attention
    from sparse_prefill.kernels.executors import ReferenceExecutor

    identifier = registry.get_pattern("anchor").build(theta=4.0, block=16, sink=16, local=16, dense_tail=0,
                                                      dense_above=1.0)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, 64, 32, generator=gen) for heads in (2, 1, 1))
    out = sparse_attention(q, k, v, identifier)[0]  # chosen by select_executor among the registered executors
    torch.testing.assert_close(out, sparse_attention(q, k, v, identifier, executor=ReferenceExecutor())[0])


def test_an_executor_without_a_name_is_refused_and_anchor_dispatch_keeps_working(fresh_registry):
    registry.register_plugin(_executor_plugin(_Declining(), _ZeroExecutor()), name="nameless")
    registry.register_plugin(_executor_plugin(_Bystander()), name="bystander")
    with pytest.warns(RuntimeWarning, match=r"'nameless'.*sparse_prefill_executors.*name is missing"):
        names = _executor_names()
    # The whole hook result of the broken plugin is dropped (its valid executor too); others keep working.
    assert "test-zeros" not in names and {"reference", "test-bystander"} <= names
    (error,) = registry.plugin_errors()
    assert isinstance(error, registry.PluginLoadError) and "ignoring all it returned" in str(error)
    _anchor_dispatch_matches_the_reference()


@pytest.mark.parametrize(
    "attribute, bad",
    [
        ("name", ""),
        ("name", 7),
        ("plan_kinds", [StripePlan]),
        ("plan_kinds", ()),
        ("plan_kinds", ("StripePlan",)),
        ("devices", "cpu"),
        ("devices", {torch.device("cpu")}),
        ("dtypes", {"float16"}),
        ("head_dims", [64]),
        ("head_dims", {64.0}),
        ("priority", "high"),
        ("priority", True),
        ("not_supported_reasons", None),
    ],
)
def test_an_executor_breaking_its_contract_is_refused_by_name(fresh_registry, attribute, bad):
    broken = type("BrokenExecutor", (_Declining,), {"name": "test-broken", attribute: bad})()
    registry.register_plugin(_executor_plugin(broken), name="broken-exec")
    registry.register_plugin(_executor_plugin(_Bystander()), name="bystander")
    expected = rf"'broken-exec'.*BrokenExecutor.*sparse_prefill_executors.*{attribute} is"
    with pytest.warns(RuntimeWarning, match=expected):
        names = _executor_names()
    assert "test-broken" not in names and {"reference", "test-bystander"} <= names
    (error,) = registry.plugin_errors()
    assert f"({type(bad).__name__})" in str(error) and "must be" in str(error)  # what came, what is allowed
    _anchor_dispatch_matches_the_reference()


def test_an_executor_with_an_unimplemented_call_is_refused(fresh_registry):
    class Abstract(_Declining):
        name = "test-abstract"
        __call__ = Executor.__call__  # the abstract one: Executor's ABC refuses to instantiate this...

    Abstract.__abstractmethods__ = frozenset()  # ...unless forced, as a careless plugin could
    registry.register_plugin(_executor_plugin(Abstract()), name="abstract")
    with pytest.warns(RuntimeWarning, match=r"'abstract'.*__call__ is"):
        assert "test-abstract" not in _executor_names()


def _pattern_plugin(*specs):
    class Plugin:
        @hookimpl
        def sparse_prefill_patterns(self):
            return list(specs)

    return Plugin()


@pytest.mark.parametrize(
    "field, bad",
    [
        ("name", ""),
        ("name", 42),
        ("description", None),
        ("parameters", [Parameter(int, 1, "w")]),
        ("parameters", {"w": 3}),
        ("parameters", {1: Parameter(int, 1, "w")}),
        ("make_identifier", "DenseIdentifier"),
    ],
)
def test_a_pattern_spec_breaking_its_contract_is_refused_by_name(fresh_registry, field, bad):
    spec = dataclasses.replace(PatternSpec("broken", "a pattern", {}, DenseIdentifier), **{field: bad})
    registry.register_plugin(_pattern_plugin(spec, PatternSpec("sibling", "valid", {}, DenseIdentifier)),
                             name="broken-pattern")
    registry.register_plugin(_pattern_plugin(PatternSpec("other", "valid", {}, DenseIdentifier)), name="other")
    with pytest.warns(RuntimeWarning, match=rf"'broken-pattern'.*sparse_prefill_patterns.*{field} is"):
        names = {info.name for info in registry.available_patterns()}
    assert {"anchor", "other"} <= names and not {"broken", "sibling"} & names
    (error,) = registry.plugin_errors()
    assert "must be" in str(error)
    assert registry.get_pattern("other").build().__class__ is DenseIdentifier


def test_a_pattern_whose_factory_returns_no_identifier_fails_when_built(fresh_registry):
    registry.register_plugin(_pattern_plugin(PatternSpec("not-an-identifier", "", {}, dict)), name="factory")
    spec = registry.get_pattern("not-an-identifier")  # not built when collected: that would run plugin code
    with pytest.raises(TypeError, match=r"pattern 'not-an-identifier'.*returned dict.*Identifier"):
        spec.build()


def test_each_failure_is_recorded_and_warned_once_across_registrations(fresh_registry):
    class Shadow:
        @hookimpl
        def sparse_prefill_patterns(self):
            return [PatternSpec("anchor", "shadow", {}, DenseIdentifier)]

    class Failing:
        @hookimpl
        def sparse_prefill_executors(self):
            raise ImportError("needs libfoo.so")

    class WrongType:
        @hookimpl
        def sparse_prefill_patterns(self):
            return [object()]  # a new object, so a new repr, on every call

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name, plugin in [("shadow", Shadow()), ("failing", Failing()), ("wrong", WrongType())]:
            registry.register_plugin(plugin, name=name)
        for i in range(3):
            late = _pattern_plugin(PatternSpec(f"late-{i}", "", {}, DenseIdentifier))
            registry.register_plugin(late, name=f"late-{i}")
            assert f"late-{i}" in {info.name for info in registry.available_patterns()}  # the cache follows
            assert "reference" in _executor_names()
    messages = [str(error) for error in registry.plugin_errors()]
    assert len(messages) == 3 and len(set(messages)) == 3
    assert [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)] == messages


@pytest.mark.parametrize("not_a_plugin", [42, None, types.ModuleType("no_markers"), object()])
def test_register_plugin_refuses_an_object_implementing_no_hook(fresh_registry, not_a_plugin):
    if isinstance(not_a_plugin, types.ModuleType):
        not_a_plugin.sparse_prefill_patterns = lambda: []  # the right name, but no @hookimpl marker
    with pytest.raises(TypeError, match=r"implements no sparse_prefill hook.*sparse_prefill_patterns.*hookimpl"):
        registry.register_plugin(not_a_plugin)
    assert registry.plugin_errors() == [] and not registry.get_registry().manager.is_registered(not_a_plugin)


def test_an_entry_point_that_is_no_plugin_is_recorded_not_raised(fresh_registry, monkeypatch):
    module = types.ModuleType("test_plugin_unmarked")
    module.sparse_prefill_patterns = lambda: [PatternSpec("unmarked", "", {}, DenseIdentifier)]
    monkeypatch.setitem(sys.modules, module.__name__, module)
    unmarked = importlib.metadata.EntryPoint("unmarked", module.__name__, registry.ENTRY_POINT_GROUP)
    real = importlib.metadata.entry_points
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda **kwargs: [*real(**kwargs), unmarked])
    with pytest.warns(RuntimeWarning, match=r"'unmarked'.*implements no sparse_prefill hook"):
        names = {info.name for info in registry.available_patterns()}
    assert "anchor" in names and "unmarked" not in names
    (error,) = registry.plugin_errors()
    assert isinstance(error, registry.PluginLoadError)
