import dataclasses
import re

import pytest

from sparse_prefill.cli import main
from sparse_prefill.interfaces import HeadValues
from sparse_prefill.policy import PolicyError, load_policy, shipped_policies
from sparse_prefill.registry import get_pattern

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


def test_call_groups_merge_choices_that_differ_only_in_per_head_parameters():
    """Anchor's theta may differ per head within one call; anything else (another pattern, another local
    window) still splits the call. Values are indexed by global head, so a tensor-parallel rank's call
    (head_offset) and its chunks find theirs."""
    policy = load_policy({"default": {"pattern": "anchor", "theta": 5}, "overrides": [
        {"heads": "6-7", "theta": 9, "pattern": "anchor"},
        {"heads": 5, "pattern": "dense"},
        {"heads": 4, "pattern": "anchor", "theta": 5, "local": 256},
        {"layers": 1, "heads": "0-7", "pattern": "anchor", "theta": 6},
    ]})
    groups = policy.call_groups(layer=0, num_heads=4, head_offset=4)  # global heads 4..7
    assert [(g.heads, g.choice.pattern) for g in groups] == [((0,), "anchor"), ((1,), "dense"), ((2, 3), "anchor")]
    merged = policy.call_groups(layer=0, num_heads=8)
    assert [g.heads for g in merged] == [(0, 1, 2, 3, 6, 7), (4,), (5,)]
    theta = merged[0].choice.as_dict()["theta"]
    assert isinstance(theta, HeadValues) and theta.for_heads(2, 2) == (5.0, 5.0) and theta.for_heads(6, 2) == (9.0, 9.0)
    assert str(theta) == "[5.0 (heads 0-3), 9.0 (heads 6-7)]"
    with pytest.raises(ValueError, match="no value for some of query heads 3-4"):
        theta.for_heads(3, 2)  # head 4 runs another choice
    assert {k: v for k, v in merged[0].choice.params if k != "theta"} == {
        k: v for k, v in policy.choice_for(0, 0).params if k != "theta"}
    assert policy.call_groups(layer=1, num_heads=8) == policy.assign_heads(layer=1, num_heads=8)  # one choice
    streaming = load_policy({"default": {"pattern": "streaming"}, "overrides": [
        {"heads": 0, "pattern": "streaming", "local": 256}]})
    assert streaming.call_groups(0, 4) == streaming.assign_heads(0, 4)  # no per-head parameter: apart


def test_a_merged_choice_builds_an_identifier_and_checks_each_head_value():
    policy = load_policy({"default": {"pattern": "anchor", "theta": 5}, "overrides": [
        {"heads": 1, "pattern": "anchor", "theta": 7}]})
    (group,) = policy.call_groups(0, 2)
    assert policy.identifier(group.choice) is policy.identifier(group.choice)  # built once
    with pytest.raises(ValueError, match="parameter 'theta'.*nan"):
        get_pattern("anchor").build(theta=HeadValues(0, (5.0, float("nan"))))
    with pytest.raises(ValueError, match="parameter 'local'"):
        get_pattern("anchor").build(local=HeadValues(0, (128, 256)))  # not a per-head parameter


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
        ({"default": {"pattern": ["anchor"]}}, "default.pattern", "available: .*anchor"),
        ({"default": {"pattern": "dense"}, "overrides": [{"layers": "\u00b2-5", "pattern": "dense"}]},
         r"overrides\[0\].layers", '"a-b"'),
        ({"default": {"pattern": "dense"}, "overrides": [{"heads": "\u0661-3", "pattern": "dense"}]},
         r"overrides\[0\].heads", '"a-b"'),
        ({"default": {"pattern": "dense"}, "overrides": {}}, "overrides", "list"),
        ({"default": {"pattern": "dense"}, "overrides": False}, "overrides", "list"),
        ({"default": {"pattern": "dense"}, "overrides": 0}, "overrides", "list"),
        ({"default": {"pattern": "dense"}, "overrides": ""}, "overrides", "list"),
        ({"default": {"pattern": "anchor", "block": 256}}, "default.block", "at most 128"),
        ({"default": {"pattern": "anchor", "block": 144}}, "default.block", "at most 128"),
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
    names = shipped_policies()
    assert {"anchor.yaml", "flexprefill.yaml", "xattention.yaml", "flashprefill.yaml"} <= set(names)
    assert main(["validate", *(f"sparse_prefill/policies/{name}" for name in names)]) == 0
    assert "default: anchor(" in capsys.readouterr().out
    for name in ("xattention.yaml", "flashprefill.yaml"):  # the published defaults are the patterns' defaults
        policy = load_policy(name)
        defaults = {key: parameter.default for key, parameter in get_pattern(policy.default.pattern).parameters.items()}
        assert policy.default.as_dict() == defaults


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


def test_overrides_missing_or_null_mean_none():
    assert load_policy({"default": {"pattern": "dense"}, "overrides": None}).overrides == ()
    assert load_policy({"default": {"pattern": "dense"}}).overrides == ()


def test_non_utf8_file_names_the_file(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("default:\n  pattern: anchor\n# caf\u00e9\n".encode("latin-1"))
    with pytest.raises(PolicyError, match=rf"{path}: line 3: .*UTF-8"):
        load_policy(path)


def test_unreadable_file_names_the_file(tmp_path, monkeypatch):
    path = tmp_path / "p.yaml"
    path.write_text("default:\n  pattern: dense\n")

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(type(path), "read_bytes", refuse)
    with pytest.raises(PolicyError, match=rf"{path}: cannot read: Permission denied"):
        load_policy(path)


def test_repeated_yaml_key_names_file_line_and_key(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("default:\n  pattern: anchor\n  theta: 12.0\n  theta: 2.0\n")
    with pytest.raises(PolicyError, match=rf"^{path}: ") as info:
        load_policy(path)
    assert "'theta'" in str(info.value) and "line 4" in str(info.value)


def test_yaml_merge_keys_still_load(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text("overrides:\n  - &dense {layers: 0, pattern: dense}\n  - {<<: *dense, layers: 1}\n"
                    "default:\n  <<: {pattern: anchor, theta: 3.0}\n  theta: 5.0\n")
    policy = load_policy(path)
    assert policy.default.as_dict()["theta"] == 5.0
    assert policy.choice_for(1, 0).pattern == "dense"


def test_replaced_policy_does_not_share_caches():
    policy = load_policy({"default": {"pattern": "anchor"}, "overrides": [{"heads": 0, "pattern": "dense"}]})
    assert policy.assign_heads(0, 2)[0].choice.pattern == "dense"
    plain = dataclasses.replace(policy, overrides=())
    assert [(g.heads, g.choice.pattern) for g in plain.assign_heads(0, 2)] == [((0, 1), "anchor")]


def test_huge_ranges_stay_compact():
    policy = load_policy({"default": {"pattern": "anchor"},
                          "overrides": [{"layers": [5, "3-7", 9, "0-1000000"], "heads": [8, "3-4", 5],
                                         "pattern": "dense"}]})
    assert "layers 0-1000000, heads 3-5,8: dense()" in policy.describe()
    assert policy.choice_for(1000000, 3).pattern == "dense"
    assert policy.choice_for(1000001, 3).pattern == "anchor"
    assert policy.choice_for(0, 6).pattern == "anchor"


@pytest.mark.parametrize(
    "override, where, index, allowed",
    [
        ({"layers": 2}, r"overrides\[1\]\.layers", "layer 2", "0..1"),
        ({"layers": ["0-1", "3-9"]}, r"overrides\[1\]\.layers", "layer 3", "0..1"),
        ({"heads": "4-7"}, r"overrides\[1\]\.heads", "query head 4", "0..3"),
    ],
)
def test_check_model_names_the_override_index_and_range(override, where, index, allowed):
    policy = load_policy({"default": {"pattern": "anchor"},
                          "overrides": [{"layers": 0, "heads": 0, "pattern": "dense"}, {**override, "pattern": "dense"}]})
    with pytest.raises(PolicyError, match=rf"^<dict>: {where}: ") as info:
        policy.check_model(num_layers=2, num_heads=4)
    assert index in str(info.value) and allowed in str(info.value)


def test_check_model_accepts_indices_inside_the_model():
    policy = load_policy({"default": {"pattern": "anchor"},
                          "overrides": [{"layers": "0-1", "heads": [0, "2-3"], "pattern": "dense"}, {"pattern": "dense"}]})
    policy.check_model(num_layers=2, num_heads=4)


def test_anchor_block_limit_matches_the_triton_identifier():
    from sparse_prefill.patterns.anchor.kernel import MAX_BLOCK

    assert load_policy({"default": {"pattern": "anchor", "block": MAX_BLOCK}}).default.as_dict()["block"] == MAX_BLOCK
    with pytest.raises(PolicyError, match="default.block"):
        load_policy({"default": {"pattern": "anchor", "block": MAX_BLOCK + 16}})


@pytest.mark.parametrize("source", [[{"default": {"pattern": "dense"}}], None, 42, b"anchor.yaml"])
def test_an_unloadable_source_says_what_is_accepted(source):
    with pytest.raises(PolicyError) as info:
        load_policy(source)
    message = str(info.value)
    assert type(source).__name__ in message
    for accepted in ("YAML path", "os.PathLike", "shipped policy", "anchor.yaml", "mapping", "Policy"):
        assert accepted in message


@pytest.mark.parametrize(
    "key, text, value",
    [("theta", "1e6", 1e6), ("theta", "1.0e6", 1e6), ("theta", "25E-4", 2.5e-3), ("theta", "-7e+2", -700.0),
     ("sink", "1e2", 100)],
)
def test_a_number_yaml_reads_as_a_string_gets_a_spelling_that_loads(tmp_path, key, text, value):
    path = tmp_path / "p.yaml"
    path.write_text(f"default:\n  pattern: anchor\n  {key}: {text}\n")
    with pytest.raises(PolicyError, match=rf"default\.{key}: expected") as info:
        load_policy(path)
    message = str(info.value)
    assert f"YAML 1.1 (how policy files are read) takes {text} for a string" in message
    spelling = re.search(r"as (\S+)$", message)[1]
    if isinstance(value, float):
        assert "." in spelling and re.search(r"e[-+]\d", spelling)  # a decimal point and a signed exponent
    path.write_text(f"default:\n  pattern: anchor\n  {key}: {spelling}\n")
    loaded = load_policy(path).default.as_dict()[key]
    assert loaded == value and type(loaded) is type(value)
    # PatternSpec.build checks through the same Parameter.coerce, so it says the same.
    from sparse_prefill.registry import get_pattern

    with pytest.raises(ValueError, match=re.escape(message.split(": expected", 1)[1])):
        get_pattern("anchor").build(**{key: text})


@pytest.mark.parametrize("text", ['"7.5"', "big", "[1.0e+6]"])
def test_only_numbers_yaml_reads_as_strings_get_the_yaml_hint(tmp_path, text):
    path = tmp_path / "p.yaml"
    path.write_text(f"default:\n  pattern: anchor\n  theta: {text}\n")
    with pytest.raises(PolicyError, match=r"default\.theta: expected float") as info:
        load_policy(path)
    assert "YAML 1.1" not in str(info.value)


def test_index_runs_joins_consecutive_indices() -> None:
    from sparse_prefill.policy import index_runs

    assert index_runs([5, 0, 2, 1, 2]) == [(0, 2), (5, 5)]
    assert index_runs([]) == [] and index_runs(range(4)) == [(0, 3)]
