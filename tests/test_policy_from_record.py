"""benchmarks/policy_from_record.py: a record's policy description becomes the policy file that ran, or is refused."""

import json
from pathlib import Path

import pytest

from benchmark_scripts import load_benchmark
from sparse_prefill.policy import load_policy, shipped_policies

rebuilder = load_benchmark("policy_from_record")
RECORDS = Path(__file__).parents[1] / "docs" / "benchmarks"


@pytest.mark.parametrize("name", shipped_policies())
def test_every_shipped_policy_comes_back_from_its_description(name, tmp_path):
    description = load_policy(name).describe()
    got = rebuilder.rebuild(description, tmp_path / "p.yaml")
    assert rebuilder.description_body(got) == rebuilder.description_body(description)
    assert load_policy(tmp_path / "p.yaml").guard == load_policy(name).guard  # anchor.yaml carries one


def test_a_committed_record_policy_rebuilds_with_its_overrides(tmp_path):
    record = json.loads((RECORDS / "floor_sweep_qwen25_coder_05b_32k.json").read_text())
    description = rebuilder.record_policies(record)["layers-floor0.7"]
    rebuilder.rebuild(description, tmp_path / "p.yaml")
    policy = load_policy(tmp_path / "p.yaml")
    assert rebuilder.description_body(policy.describe()) == rebuilder.description_body(description)
    assert policy.choice_for(3, 0).pattern == "dense"  # a whole dense layer, as the record says
    assert policy.choice_for(2, 0) != policy.choice_for(2, 7)  # a theta per KV group


def test_a_description_it_cannot_reproduce_is_refused_and_nothing_is_written(tmp_path):
    out = tmp_path / "p.yaml"
    partial = "policy from x.yaml\n  min_length: 0\n  default: anchor(theta=11.0)"  # resolved lines list every param
    with pytest.raises(rebuilder.DescriptionError, match="differently"):
        rebuilder.rebuild(partial, out)
    assert not out.exists()
    with pytest.raises(rebuilder.DescriptionError, match="cannot read"):
        rebuilder.policy_from_description("policy from x.yaml\n  something else: 1")
    with pytest.raises(rebuilder.DescriptionError, match="does not load"):
        rebuilder.rebuild("policy from x.yaml\n  min_length: 0\n  default: nosuchpattern(a=1)", out)
    assert not out.exists()


def test_a_missing_or_unreadable_record_or_label_is_named_before_anything_is_written(tmp_path, monkeypatch):
    not_json = tmp_path / "notes.txt"
    not_json.write_text("not a record")
    record = str(RECORDS / "floor_sweep_qwen25_coder_05b_32k.json")
    for argv, said in (([str(tmp_path / "missing.json"), "x"], "cannot read the record"),
                       ([str(not_json), "x"], "cannot read the record"),
                       ([record, "no-such-label"], "no policy 'no-such-label'; it has: ")):
        monkeypatch.setattr("sys.argv", ["policy_from_record.py", *argv, "--out", str(tmp_path / "p.yaml")])
        with pytest.raises(SystemExit, match=said):
            rebuilder.main()
        assert not (tmp_path / "p.yaml").exists()


def _record_descriptions() -> list[tuple[str, str, str]]:
    found = []
    for path in sorted(RECORDS.glob("*.json")):
        record = json.loads(path.read_text())
        if isinstance(record, dict):
            found += [(path.name, label, text) for label, text in rebuilder.record_policies(record).items()]
    return found


def test_every_committed_record_policy_comes_back(tmp_path):
    """The records' commands name policy files that are not in the tree; each must be rebuildable from its record."""
    descriptions = _record_descriptions()
    assert len(descriptions) > 100  # the eval records hold about two hundred
    failed = []
    for record, label, description in descriptions:
        try:
            rebuilder.rebuild(description, tmp_path / "p.yaml")
        except rebuilder.DescriptionError as exc:
            failed.append(f"{record} {label}: {exc}")
    assert not failed, "\n".join(failed)


def test_a_parameter_added_since_a_record_matches_only_at_its_default():
    """A record written before xattention had ``float8_scores`` ran its default (off); nothing else is forgiven."""
    old = "  default: xattention(block=128, dense_above=0.4, stride=8, threshold=0.9)"
    assert rebuilder._same_line(old.replace(")", ", float8_scores=False)"), old)
    assert not rebuilder._same_line(old.replace(")", ", float8_scores=True)"), old)
    assert not rebuilder._same_line(old.replace("0.9)", "0.8, float8_scores=False)"), old)
    assert not rebuilder._same_line(old.replace(")", ", other=1)"), old)
