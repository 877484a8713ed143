import importlib.metadata

import pytest

from sparse_prefill import registry
from sparse_prefill.hookspecs import hookimpl


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
