import re

import pytest

from sparse_prefill.cli import main
from sparse_prefill.policy import PolicyError, load_policy

ANCHOR_DEFAULT = {"default": {"pattern": "anchor"}}


def test_defaults_are_filled_and_overrides_win_in_order():
    policy = load_policy(
        {
            "min_length": 64,
            "default": {"pattern": "anchor", "theta": 7},
            "overrides": [
                {"layers": [0, "2-3"], "pattern": "dense"},
                {"layers": 3, "heads": "4-5", "pattern": "streaming", "local": 256},
            ],
        }
    )
    assert policy.min_length == 64
    assert policy.choice_for(1, 0).as_dict()["theta"] == 7.0  # int accepted for a float parameter
    assert policy.choice_for(2, 4).pattern == "dense"
    assert policy.choice_for(3, 4).pattern == "streaming"
    assert policy.choice_for(3, 4).as_dict() == {"sink": 128, "local": 256, "group_rows": 128}
    assert policy.choice_for(3, 6).pattern == "dense"


def test_assign_heads_groups_local_heads_with_global_offset():
    policy = load_policy({"default": {"pattern": "anchor"}, "overrides": [{"heads": [5, 6], "pattern": "dense"}]})
    groups = policy.assign_heads(layer=0, num_heads=4, head_offset=4)  # global heads 4..7
    assert [(g.heads, g.choice.pattern) for g in groups] == [((0, 3), "anchor"), ((1, 2), "dense")]


@pytest.mark.parametrize(
    "raw, where, allowed",
    [
        ({"default": {"pattern": "anchor"}, "bogus": 1}, "bogus", "allowed: min_length, default, overrides"),
        ({}, "default", "missing"),
        ({"default": {"pattern": "nope"}}, "default.pattern", "available:"),
        ({"default": {"pattern": "anchor", "thetaa": 1}}, "default.thetaa", "allowed: pattern, theta"),
        ({"default": {"pattern": "anchor", "theta": "big"}}, "default.theta", "expected float"),
        ({"default": {"pattern": "anchor", "block": 100}}, "default.block", "multiple of 16"),
        ({"default": {"pattern": "anchor", "theta": float("inf")}}, "default.theta", "finite"),
        ({"default": {"pattern": "anchor", "dense_tail": -1}}, "default.dense_tail", ">= 0"),
        ({"default": {"pattern": "anchor", "dense_above": 1.5}}, "default.dense_above", r"density in \(0, 1\]"),
        ({"default": {"pattern": "anchor", "share_kv_heads": 1}}, "default.share_kv_heads", "expected bool"),
        ({"default": {"pattern": "anchor", "sink": True}}, "default.sink", "expected int"),
        ({"default": {"pattern": "anchor", "layers": 1}}, "default.layers", "unknown key"),
        ({"default": {"pattern": "dense"}, "min_length": -1}, "min_length", "integer >= 0"),
        ({"default": {"pattern": "dense"}, "overrides": {"a": 1}}, "overrides", "list"),
        ({"default": {"pattern": "dense"}, "overrides": [{"layers": "3-1", "pattern": "dense"}]},
         r"overrides\[0\].layers", '"a-b"'),
        ({"default": {"pattern": "dense"}, "overrides": [{"heads": [], "pattern": "dense"}]},
         r"overrides\[0\].heads", "empty"),
        ({"default": {"pattern": "dense"}, "overrides": [{"layers": 1}]}, r"overrides\[0\].pattern", "missing"),
    ],
)
def test_invalid_policies_name_the_key_and_what_is_allowed(raw, where, allowed):
    with pytest.raises(PolicyError, match=where) as info:
        load_policy(raw)
    assert re.search(allowed, str(info.value))
    assert str(info.value).startswith("<dict>:")


def test_yaml_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("default:\n  pattern: anchor\n  theta: [1, 2]\n")
    with pytest.raises(PolicyError, match=rf"{path}: default.theta: expected float"):
        load_policy(path)
    path.write_text("default: {pattern: anchor\n")
    with pytest.raises(PolicyError, match="not valid YAML"):
        load_policy(path)
    with pytest.raises(PolicyError, match="no such policy file"):
        load_policy(tmp_path / "missing.yaml")


def test_yaml_is_loaded_safely(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("default: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(PolicyError, match="not valid YAML"):
        load_policy(path)


def test_shipped_policies_validate(capsys):
    assert main(["validate", "sparse_prefill/policies/anchor.yaml", "sparse_prefill/policies/anchor-accurate.yaml",
                 "sparse_prefill/policies/streaming.yaml",
                 "sparse_prefill/policies/dense.yaml"]) == 0
    assert "default: anchor(" in capsys.readouterr().out


def test_cli_validate_reports_errors(tmp_path, capsys):
    path = tmp_path / "p.yaml"
    path.write_text("default:\n  pattern: streaming\n  window: 3\n")
    assert main(["validate", str(path)]) == 1
    assert "default.window: unknown key" in capsys.readouterr().err


def test_shipped_policies_load_by_bare_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_policy("anchor.yaml").default.pattern == "anchor"
    (tmp_path / "anchor.yaml").write_text("default:\n  pattern: dense\n")
    assert load_policy("anchor.yaml").default.pattern == "dense"  # a local file wins
    with pytest.raises(PolicyError, match="shipped policies: anchor-accurate.yaml, anchor.yaml"):
        load_policy("nope.yaml")
