"""Anchor's settings per (layer, KV group) for a mean recall target: measured options, allocation, written policy."""

import itertools
import json
import math
import random

import pytest
import torch

from sparse_prefill.cli import main
from sparse_prefill.evaluation.kv_group_calibration import (
    GroupOption,
    allocate_one_call_per_layer,
    allocate_settings,
    group_calibrated_policy,
    measure_group_options,
    one_setting_per_layer,
    options_from_record,
    options_record,
)
from sparse_prefill.evaluation.recall import attention_recall, head_recalls
from sparse_prefill.evaluation.synthetic import structured_qkv
from sparse_prefill.patterns.anchor.reference import anchor_identify_reference
from sparse_prefill.plan import DensePlan
from sparse_prefill.policy import load_policy

PARAMS = dict(block=64, group_blocks=1, sink=64, local=64, share_kv_heads=True, dense_tail=0, dense_above=1.0)


def _plan(q, k, theta, **params):
    return anchor_identify_reference(q, k, scale=q.shape[-1] ** -0.5, **{**PARAMS, **params, "theta": theta})


@pytest.mark.parametrize("share_kv_heads", [True, False])
def test_head_recalls_are_each_heads_attention_recall_for_every_plan_at_once(share_kv_heads):
    q, k, _ = structured_qkv(320, 4, 2, 32, device="cpu", dtype=torch.float32, seed=5)
    scale = q.shape[-1] ** -0.5
    plans = [_plan(q, k, theta, share_kv_heads=share_kv_heads) for theta in (2.0, 6.0)] + [DensePlan(1, 4, 320)]
    recalls = head_recalls(q, k, plans, scale)
    assert recalls.shape == (3, 4) and torch.isfinite(recalls).all()
    for i, plan in enumerate(plans):
        assert float(recalls[i].mean()) == pytest.approx(attention_recall(q, k, plan, scale), rel=1e-9)
        for head in range(4):
            kv = head // 2
            plan_head = head if share_kv_heads is False and not isinstance(plan, DensePlan) else kv
            part = plan if isinstance(plan, DensePlan) else plan.select_heads(plan_head, plan_head + 1)
            alone = attention_recall(q[:, head:head + 1], k[:, kv:kv + 1],
                                     DensePlan(1, 1, 320) if isinstance(plan, DensePlan) else part, scale)
            assert float(recalls[i, head]) == pytest.approx(alone, rel=1e-9)
    assert (recalls[2] == 1).all() and (recalls[0] <= recalls[1] + 1e-12).all()


def test_head_recalls_refuses_plans_of_different_row_groups():
    q, k, _ = structured_qkv(256, 2, 1, 32, device="cpu", dtype=torch.float32, seed=1)
    with pytest.raises(ValueError, match="query rows per group"):
        head_recalls(q, k, [_plan(q, k, 4.0), _plan(q, k, 4.0, block=32)], q.shape[-1] ** -0.5)


def test_measured_options_grow_with_theta_and_match_the_plans():
    q, k, _ = structured_qkv(384, 6, 2, 32, device="cpu", dtype=torch.float32, seed=2)
    options = measure_group_options({3: (q, k)}, PARAMS, [8.0, 2.0, 5.0])
    assert sorted(options) == [(3, 0), (3, 1)]
    for (_, group), choices in options.items():
        assert [(o.theta, o.dense) for o in choices] == [(2.0, False), (5.0, False), (8.0, False), (math.inf, True)]
        for low, high in itertools.pairwise(choices):
            assert high.density >= low.density
            # A full selection measures 1 to rounding, sometimes a hair over.
            assert all(b >= a - 1e-8 for a, b in zip(low.head_recalls, high.head_recalls))
        plan = _plan(q, k, 5.0).select_heads(group, group + 1)
        assert choices[1].density == pytest.approx(plan.density())
        heads = slice(3 * group, 3 * group + 3)
        assert choices[1].recall == pytest.approx(attention_recall(q[:, heads], k[:, group:group + 1], plan,
                                                                   q.shape[-1] ** -0.5))


def test_a_selection_over_dense_above_is_measured_as_the_dense_call_that_replaces_it():
    q, k, _ = structured_qkv(384, 4, 2, 32, device="cpu", dtype=torch.float32, seed=4)
    free = measure_group_options({0: (q, k)}, PARAMS, [3.0, 30.0])
    capped = measure_group_options({0: (q, k)}, {**PARAMS, "dense_above": 0.5}, [3.0, 30.0])
    for key in free:
        for loose, kept in zip(free[key], capped[key]):
            if loose.density > 0.5:
                assert kept == GroupOption(loose.theta, 64, (1.0, 1.0), 1.0, dense=True)
            else:
                assert kept == loose
    assert any(o.density == 1.0 for choices in capped.values() for o in choices)


def _random_options(rng: random.Random, groups: int, thetas: int = 5) -> dict:
    """Monotone random curves: recall and density grow with theta, as anchor's do."""
    options = {}
    for group in range(groups):
        recalls, density, out = [rng.uniform(0.5, 0.9) for _ in range(3)], rng.uniform(0.05, 0.2), []
        for t in range(thetas):
            recalls = [min(1.0, r + rng.uniform(0, 0.1)) for r in recalls]
            density = min(1.0, density + rng.uniform(0.01, 0.15))
            out.append(GroupOption(float(t), 64, tuple(recalls), density))
        options[(group // 2, group % 2)] = out
    return options


def _brute_force(options, target, floor):
    keys = sorted(options)
    best = None
    for combo in itertools.product(*(options[key] for key in keys)):
        if min(o.worst_head for o in combo) < floor or sum(o.recall for o in combo) / len(combo) < target:
            continue
        density = sum(o.density for o in combo) / len(combo)
        best = density if best is None else min(best, density)
    return best


@pytest.mark.parametrize("seed", range(12))
def test_allocation_meets_the_target_and_is_never_worse_than_one_theta(seed):
    rng = random.Random(seed)
    options = _random_options(rng, 4)
    target, floor = rng.uniform(0.8, 0.97), rng.choice([0.0, 0.7])
    result = allocate_settings(options, 3, target, floor)
    optimum = _brute_force(options, target, floor)
    if optimum is None:
        assert not result.reached or result.recall < target
        return
    assert result.reached and result.recall >= target - 1e-12 and result.worst_head >= floor
    assert result.density >= optimum - 1e-12
    uniform = [sum(o[t].density for o in options.values()) / 4 for t in range(5)
               if all(o[t].worst_head >= floor for o in options.values())
               and sum(o[t].recall for o in options.values()) / 4 >= target]
    if uniform:
        assert result.density <= min(uniform) + 1e-12
    assert [(g.layer, g.heads) for g in result.groups] == [(key[0], range(3 * key[1], 3 * key[1] + 3))
                                                          for key in sorted(options)]


def test_an_unreachable_target_takes_the_largest_thetas_and_says_so():
    options = {(0, 0): [GroupOption(1.0, 64, (0.5,), 0.1), GroupOption(2.0, 64, (0.8,), 0.3)]}
    result = allocate_settings(options, 1, 0.9)
    assert not result.reached and result.groups[0].option.theta == 2.0


def test_allocation_refuses_impossible_arguments():
    with pytest.raises(ValueError, match="target_recall"):
        allocate_settings({(0, 0): [GroupOption(1.0, 64, (0.5,), 0.1)]}, 1, 1.5)
    with pytest.raises(ValueError, match="at least one"):
        allocate_settings({(0, 0): []}, 1, 0.9)


def test_written_policy_gives_each_group_its_setting(tmp_path):
    base = load_policy({"min_length": 1024, "default": {"pattern": "anchor", "local": 256, "sink": 32}})
    options = {(0, 0): [GroupOption(5.0, 256, (0.99, 0.98), 0.1)], (0, 1): [GroupOption(9.0, 1024, (0.95, 0.91), 0.3)],
               (2, 0): [GroupOption(6.0, 128, (0.96, 0.97), 0.2)], (2, 1): [GroupOption(6.0, 128, (0.97, 0.96), 0.2)]}
    path = tmp_path / "groups.yaml"
    path.write_text(group_calibrated_policy(base, allocate_settings(options, 2, 0.9), "header"))
    policy = load_policy(path)
    policy.check_model(num_layers=4, num_heads=4)
    expected = {(0, 0): (5.0, 256), (0, 1): (5.0, 256), (0, 2): (9.0, 1024), (0, 3): (9.0, 1024), (2, 0): (6.0, 128),
                (2, 3): (6.0, 128), (1, 0): (9.0, 1024)}
    for (layer, head), (theta, local) in expected.items():  # layer 1 was not measured: the largest of each
        choice = policy.choice_for(layer, head).as_dict()
        assert (choice["theta"], choice["local"], choice["sink"]) == (theta, local, 32)
    assert len(policy.overrides) == 3  # layer 2's groups share one override


def _one_call_options(rng: random.Random) -> dict:
    """3 layers x 2 KV groups of 3 heads; per group 3 thetas at each of two windows (rising curves, the densest
    sometimes past dense_above) and the explicit dense option."""
    options = {}
    for key in itertools.product(range(3), range(2)):
        out = []
        for local in (64, 256):
            recalls, density = [rng.uniform(0.5, 0.9) for _ in range(3)], rng.uniform(0.05, 0.2)
            for theta in (4.0, 8.0, 12.0):
                recalls = [min(1.0, r + rng.uniform(0, 0.12)) for r in recalls]
                density = min(1.0, density + rng.uniform(0.01, 0.2))
                past = density > 0.45 and rng.random() < 0.5  # its plan passed dense_above: the dense call
                out.append(GroupOption(theta, local, (1.0,) * 3, 1.0, dense=True) if past
                           else GroupOption(theta, local, tuple(recalls), density))
        out.append(GroupOption(math.inf, 64, (1.0,) * 3, 1.0, dense=True))
        options[key] = out
    return options


def _one_call(combo) -> bool:
    """Whether each layer's chosen options run as one call: all dense, or all sparse at one window."""
    modes: dict[int, set] = {}
    for (layer, _group), option in combo:
        modes.setdefault(layer, set()).add(None if option.dense else option.local)
    return all(len(seen) == 1 for seen in modes.values())


@pytest.mark.parametrize("seed", range(8))
def test_one_call_per_layer_never_mixes_a_layer_and_is_never_denser_than_one_setting(seed, tmp_path):
    rng = random.Random(seed)
    options = _one_call_options(rng)
    target, floor = rng.uniform(0.8, 0.97), rng.choice([0.0, 0.7])
    result = allocate_one_call_per_layer(options, 3, target, floor)
    assert _one_call([((g.layer, g.heads.start // 3), g.option) for g in result.groups])
    keys = sorted(options)
    feasible = [sum(o.density for o in combo) / 6 for combo in itertools.product(*(options[k] for k in keys))
                if _one_call(zip(keys, combo)) and min(o.worst_head for o in combo) >= floor
                and sum(o.recall for o in combo) / 6 >= target]
    one_setting = allocate_settings(one_setting_per_layer(options), 6, target, floor)
    if not feasible:
        assert not result.reached or result.recall < target
        return
    assert result.reached and result.recall >= target - 1e-12 and result.worst_head >= floor
    assert result.density >= min(feasible) - 1e-12
    if one_setting.reached and one_setting.recall >= target:
        assert result.density <= one_setting.density + 1e-12
    base = load_policy({"min_length": 0, "default": {"pattern": "anchor", **PARAMS}})
    path = tmp_path / "one_call.yaml"
    path.write_text(group_calibrated_policy(base, result, "header"))
    policy = load_policy(path)
    assert all(len(policy.call_groups(layer, 6)) == 1 for layer in range(3))


def test_one_setting_per_layer_joins_groups_that_ran_alike_and_leaves_out_mixed_settings():
    sparse = lambda theta, recalls, density: GroupOption(theta, 128, recalls, density)  # noqa: E731
    dense = lambda theta: GroupOption(theta, 128, (1.0, 1.0), 1.0, dense=True)  # noqa: E731
    options = {(0, 0): [sparse(4.0, (0.8, 0.9), 0.1), sparse(8.0, (0.9, 0.95), 0.3), dense(12.0)],
               (0, 1): [sparse(4.0, (0.7, 0.6), 0.2), dense(8.0), dense(12.0)],
               (1, 0): [sparse(4.0, (0.9, 0.9), 0.1), dense(math.inf)],
               (1, 1): [sparse(4.0, (0.95, 0.85), 0.3), dense(math.inf)]}
    merged = one_setting_per_layer(options)
    assert sorted(merged) == [(0, 0), (1, 0)]
    # theta 8 ran sparse in group 0 and dense in group 1: left out; theta 12 dense in both: the layer's dense
    assert merged[(0, 0)] == [sparse(4.0, (0.8, 0.9, 0.7, 0.6), pytest.approx(0.15)),
                              GroupOption(12.0, 128, (1.0,) * 4, 1.0, dense=True)]
    assert merged[(1, 0)] == [sparse(4.0, (0.9, 0.9, 0.95, 0.85), pytest.approx(0.2)),
                              GroupOption(math.inf, 128, (1.0,) * 4, 1.0, dense=True)]


def test_one_setting_per_layer_writes_one_override_per_layer_on_measured_plans(tmp_path):
    q, k, _ = structured_qkv(384, 4, 2, 32, device="cpu", dtype=torch.float32, seed=8)
    q2, k2, _ = structured_qkv(384, 4, 2, 32, device="cpu", dtype=torch.float32, seed=9)
    options = measure_group_options({0: (q, k), 1: (q2, k2)}, {**PARAMS, "dense_above": 0.6}, [2.0, 4.0, 8.0, 16.0])
    merged = one_setting_per_layer(options)
    for layer, (qq, kk) in ((0, (q, k)), (1, (q2, k2))):
        for option in merged[(layer, 0)]:
            per_group = [next(o for o in options[(layer, g)] if o.theta == option.theta) for g in (0, 1)]
            if option.dense:
                assert all(o.dense for o in per_group) or math.isinf(option.theta)
            else:  # the same heads' recalls as the groups measured apart, density their mean
                assert option.head_recalls == per_group[0].head_recalls + per_group[1].head_recalls
                assert option.density == pytest.approx((per_group[0].density + per_group[1].density) / 2)
    allocation = allocate_settings(merged, 4, 0.9, min_head_recall=0.8)
    assert allocation.worst_head >= 0.8 and allocation.recall >= 0.9
    base = load_policy({"min_length": 0, "default": {"pattern": "anchor", **PARAMS, "dense_above": 0.6}})
    path = tmp_path / "layers.yaml"
    path.write_text(group_calibrated_policy(base, allocation, "header"))
    policy = load_policy(path)
    assert len(policy.overrides) == 2 and all(o.heads is None for o in policy.overrides)


def test_a_record_gives_back_the_options_it_was_written_from():
    q, k, _ = structured_qkv(384, 4, 2, 32, device="cpu", dtype=torch.float32, seed=3)
    options = {**measure_group_options({0: (q, k)}, {**PARAMS, "dense_above": 0.5}, [2.0, 30.0]),
               **measure_group_options({2: (q, k)}, PARAMS, [2.0])}
    assert any(o.dense and math.isfinite(o.theta) for o in options[(0, 0)])  # ran dense at theta 30
    assert any(math.isinf(o.theta) for o in options[(2, 0)])  # the explicit dense option
    record = json.loads(json.dumps(options_record(options, {"note": "x"})))  # through JSON text, as on disk
    assert record["note"] == "x" and options_from_record(record) == options


def _write_record(tmp_path, params):
    options = {(0, 0): [GroupOption(4.0, 128, (0.9, 0.8), 0.1), GroupOption(math.inf, 128, (1.0, 1.0), 1.0, True)],
               (0, 1): [GroupOption(4.0, 128, (0.95, 0.9), 0.2), GroupOption(math.inf, 128, (1.0, 1.0), 1.0, True)]}
    about = {"model": "m", "tokens": 64, "text_offset": 0, "policy": "p", "params": params, "thetas": [4.0],
             "locals": [128], "query_heads": 4, "kv_heads": 2}
    path = tmp_path / "record.json"
    path.write_text(json.dumps(options_record(options, about)))
    return path


def test_cli_allocates_from_a_record_without_a_model(tmp_path, capsys):
    base = tmp_path / "base.yaml"
    base.write_text("min_length: 0\ndefault:\n  pattern: anchor\n")
    params = {k: v for k, v in load_policy(base).default.as_dict().items() if k not in ("theta", "local")}
    record = _write_record(tmp_path, params)
    out = tmp_path / "groups.yaml"
    assert main(["calibrate", "--policy", str(base), "--per-kv-group", "--from-record", str(record),
                 "--min-head-recall", "0.85", "--target-recall", "0.9", "--out", str(out)]) == 0
    policy = load_policy(out)  # group 0's worst head is under 0.85: dense; group 1 keeps theta 4
    assert policy.choice_for(0, 0).pattern == "dense" and policy.choice_for(0, 3).as_dict()["theta"] == 4.0
    assert main(["calibrate", "--policy", str(base), "--per-kv-group", "--from-record", str(record),
                 "--one-call-per-layer", "--min-head-recall", "0.85", "--out", str(out)]) == 0
    assert [o.heads for o in load_policy(out).overrides] == [None]
    capsys.readouterr()
    other = tmp_path / "other.yaml"
    other.write_text("min_length: 0\ndefault:\n  pattern: anchor\n  sink: 64\n")
    with pytest.raises(SystemExit):
        main(["calibrate", "--policy", str(other), "--per-kv-group", "--from-record", str(record), "--out", str(out)])
    assert "sink 128 (policy: 64)" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text('{"options": []}')
    with pytest.raises(SystemExit):
        main(["calibrate", "--per-kv-group", "--from-record", str(tmp_path / "bad.json"), "--out", str(out)])
    assert "not a record" in capsys.readouterr().err


def test_local_windows_are_measured_with_every_theta():
    q, k, _ = structured_qkv(512, 4, 2, 32, device="cpu", dtype=torch.float32, seed=6)
    options = measure_group_options({1: (q, k)}, PARAMS, [3.0, 6.0], locals_=[192, 64])
    for (_, group), choices in options.items():
        sparse = [(o.local, o.theta) for o in choices if not o.dense]
        assert sparse == [(64, 3.0), (64, 6.0), (192, 3.0), (192, 6.0)]
        plan = _plan(q, k, 3.0, local=192).select_heads(group, group + 1)
        assert choices[2].density == pytest.approx(plan.density())
        heads = slice(2 * group, 2 * group + 2)
        assert choices[2].recall == pytest.approx(attention_recall(q[:, heads], k[:, group:group + 1], plan,
                                                                   q.shape[-1] ** -0.5))


def test_every_group_can_stay_dense_and_a_floor_no_theta_meets_is_met_dense(tmp_path):
    q, k, _ = structured_qkv(384, 4, 2, 32, device="cpu", dtype=torch.float32, seed=3)
    options = measure_group_options({0: (q, k), 1: (q, k)}, PARAMS, [2.0, 4.0])
    for choices in options.values():
        dense = [o for o in choices if o.dense]
        assert len(dense) == 1 and dense[0].density == 1.0 and set(dense[0].head_recalls) == {1.0}
    floor = max(o.worst_head for choices in options.values() for o in choices if not o.dense) + 1e-6
    allocation = allocate_settings(options, 2, 0.5, min_head_recall=floor)
    assert allocation.reached and all(g.option.dense for g in allocation.groups)
    base = load_policy({"min_length": 0, "default": {"pattern": "anchor", "theta": 7.0}})
    path = tmp_path / "dense.yaml"
    path.write_text(group_calibrated_policy(base, allocation, "header"))
    policy = load_policy(path)
    assert all(policy.choice_for(layer, head).pattern == "dense" for layer in (0, 1) for head in range(4))
    assert policy.default.as_dict()["theta"] == 7.0  # no sparse group chose a theta: the base's


def test_a_group_whose_setting_ran_dense_is_written_dense_not_as_its_theta(tmp_path):
    base = load_policy({"min_length": 0, "default": {"pattern": "anchor"}})
    options = {(0, 0): [GroupOption(9.0, 128, (1.0, 1.0), 1.0, dense=True)],
               (0, 1): [GroupOption(5.0, 128, (0.96, 0.95), 0.2)]}
    path = tmp_path / "mixed.yaml"
    text = group_calibrated_policy(base, allocate_settings(options, 2, 0.9), "header")
    path.write_text(text)
    policy = load_policy(path)
    assert [policy.choice_for(0, head).pattern for head in range(4)] == ["dense"] * 2 + ["anchor"] * 2
    assert policy.choice_for(0, 3).as_dict()["theta"] == 5.0 and "heads 0-1: dense" in text


@pytest.mark.parametrize("argv, message", [
    (["--thetas", "4", "5"], "--thetas is for --per-kv-group"),
    (["--min-head-recall", "0.9"], "--min-head-recall is for --per-kv-group"),
    (["--per-kv-group", "--kl-budget", "0.02", "--thetas", "4"], "with --kl-budget the settings are --options"),
    (["--per-kv-group", "--kl-budget", "0.02", "--one-call-per-layer"], "--one-call-per-layer is for"),
    (["--per-kv-group", "--min-head-recall", "0.8", "1.5"], "must be in [0, 1]"),
    (["--per-kv-group", "--min-head-recall", "0.8", "0.8"], "lists a floor twice"),
    (["--one-call-per-layer"], "--one-call-per-layer is for --per-kv-group"),
    (["--record", "r.json"], "--record is for --kl-budget or --per-kv-group"),
    (["--per-kv-group", "--from-record", "r.json", "--thetas", "4"], "--thetas sets what is measured"),
    (["--per-kv-group", "--from-record", "/nonexistent/r.json"], "no such file"),
    (["--per-kv-group", "--thetas", "4", "nan"], "finite"),
    (["--locals", "512"], "--locals is for --per-kv-group"),
    (["--per-kv-group", "--locals", "128", "-1"], "key counts >= 0"),
])
def test_cli_refuses_per_kv_group_arguments_before_loading(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["calibrate", "--out", str(tmp_path / "x.yaml"), *argv])
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_cli_per_kv_group_writes_a_loadable_policy_per_floor_from_one_measurement(tmp_path, capsys):
    out = tmp_path / "groups.yaml"
    assert main(["calibrate", "--tokens", "512", "--layers", "0", "1", "--per-kv-group", "--thetas", "4", "8",
                 "--min-head-recall", "0.5", "0.95", "--target-recall", "0.9", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert not out.exists()
    for floor in ("0.5", "0.95"):
        path = tmp_path / f"groups-floor{floor}.yaml"
        policy = load_policy(path)
        assert {o.layers.ranges[0].start for o in policy.overrides} == {0, 1}
        assert f"every head >= {floor}" in path.read_text() and f"{path}: every head >= {floor}" in printed


def test_floor_paths_name_each_of_several_floors(tmp_path):
    from sparse_prefill.cli.calibrate import floor_paths

    out = tmp_path / "groups.yaml"
    assert floor_paths(out, [0.9]) == [out]
    assert floor_paths(out, [0.8, 0.9]) == [tmp_path / "groups-floor0.8.yaml", tmp_path / "groups-floor0.9.yaml"]
