"""KL budget per KV group: the combinations against brute force, the measurements against direct runs."""

import itertools
import random
from collections import Counter

import pytest
import torch
import yaml

from sparse_prefill.evaluation.group_budget import (
    GroupKL,
    kv_group_heads,
    layer_combinations,
    measure_group_kl,
)
from sparse_prefill.evaluation.layer_budget import DENSE, KLCalibration, choose_and_check, kl_calibrated_policy
from sparse_prefill.evaluation.whole_model import kl_per_position, next_token_logprobs, policy_logprobs
from sparse_prefill.policy import load_policy
from tests.test_layer_budget import calibrate_tiny_model, load_policy_text
from tests.test_whole_model import tiny_model

ANCHOR = {"pattern": "anchor", "block": 16, "sink": 8, "local": 16, "dense_above": 1.0, "dense_tail": 0}
BASE = {"min_length": 0, "default": ANCHOR}


def anchor(theta: float, local: int = 16):
    return load_policy({"default": {**ANCHOR, "theta": theta, "local": local}}).default


def random_groups(rng: random.Random, layer: int, groups: int) -> list[GroupKL]:
    """Each group: thetas at two local windows (two call modes), random costs."""
    measured = []
    for g in range(groups):
        heads = range(3 * g, 3 * g + 3)
        for theta, local in itertools.product((1.0, 2.0, 3.0, 4.0), (16, 32)):
            measured.append(GroupKL(layer, heads, f"theta={theta},local={local}", anchor(theta, local),
                                    rng.uniform(0, 0.1), rng.uniform(0.05, 1.0)))
    return measured


@pytest.mark.parametrize("seed", range(20))
def test_combinations_hold_every_price_optimum_of_all_one_call_products(seed):
    rng = random.Random(seed)
    groups = rng.choice((2, 3))
    measured = random_groups(rng, 5, groups)
    combined = layer_combinations(measured)
    assert combined[0].label == DENSE and combined[0].dense
    for option in combined[1:]:  # one call: the same window, a choice for every group; costs add up
        assert len(option.groups) == groups and len({c.as_dict()["local"] for _, c in option.groups}) == 1
        picks = [next(m for m in measured if m.heads == heads and m.choice == choice)
                 for heads, choice in option.groups]
        assert option.kl == pytest.approx(sum(p.kl for p in picks))
        assert option.density == pytest.approx(sum(p.density for p in picks) / groups)
    products = []
    for local in (16, 32):
        per_group = [[m for m in measured if m.heads.start == 3 * g and m.choice.as_dict()["local"] == local]
                     for g in range(groups)]
        products += [(sum(p.kl for p in picks), sum(p.density for p in picks) / groups)
                     for picks in itertools.product(*per_group)]
    for price in (0.0, 0.5, 2.0, 5.0, 10.0, 30.0, 100.0, 1e4):
        best = min(density + price * kl for kl, density in products)
        found = min(o.density + price * o.kl for o in combined[1:])
        assert found == pytest.approx(best, abs=1e-12)


def test_kv_group_heads():
    assert kv_group_heads(14, 2) == [range(0, 7), range(7, 14)]
    with pytest.raises(ValueError, match="do not split"):
        kv_group_heads(14, 4)


def test_group_measurements_are_what_direct_runs_give_and_a_choice_runs_one_call_per_layer():
    model = tiny_model()  # 2 layers, 4 query heads, 2 KV heads
    ids = torch.randint(1, 96, (1, 160), generator=torch.Generator().manual_seed(3))
    base = load_policy(BASE)
    options = {"theta=-0.2": anchor(-0.2), "theta=0.5": anchor(0.5)}
    groups = kv_group_heads(4, 2)
    dense = next_token_logprobs(model, ids, 32)
    measured, skipped = measure_group_kl(model, ids, base, options, [0, 1], groups, 32, dense)
    assert skipped == [] and len(measured) == 2 * 2 * 2
    for unit in measured:
        policy = load_policy({"min_length": 0, "default": {"pattern": "dense"}, "overrides": [
            {"layers": unit.layer, "heads": [f"{unit.heads.start}-{unit.heads.stop - 1}"], **unit.choice.as_dict(),
             "pattern": "anchor"}]})
        logprobs, stats = policy_logprobs(model, ids, policy, 32)
        assert unit.kl == pytest.approx(float(kl_per_position(dense, logprobs).mean()), rel=1e-3, abs=1e-9)
        plans = [d for d, layer in zip(stats.densities, stats.plan_layers) if layer == unit.layer]
        assert min(plans) == pytest.approx(unit.density) and 0 < unit.density <= 1
    assert min(unit.density for unit in measured) < 1
    combined = layer_combinations(measured)
    # Per layer: dense, both groups at 0.5, one group moved to -0.2 (the larger saving per nat first), both.
    assert Counter(o.layer for o in combined) == {0: 4, 1: 4}
    mixed = {o.layer: o for o in combined if len({c.as_dict()["theta"] for _, c in o.groups}) == 2}
    result = KLCalibration(1.0, combined, mixed)
    written = load_policy_text(kl_calibrated_policy(base, result, "header"))
    for layer, option in mixed.items():
        for heads, choice in option.groups:
            assert all(written.choice_for(layer, head) == choice for head in heads)
    logprobs, stats = policy_logprobs(model, ids, written, 32)
    assert Counter(stats.plan_layers) == {0: 1, 1: 1}  # each layer one call, its groups' thetas differing
    checked = choose_and_check(model, ids, base, combined, 1e9, dense, 32)
    assert all({c.as_dict()["theta"] for _, c in o.groups} == {-0.2} for o in checked.chosen.values())


def test_calibrate_command_per_kv_group(tmp_path):
    out, saved = calibrate_tiny_model(tmp_path, "--kl-budget", "100", "--per-kv-group", "--options", "local=16,32")
    assert saved["per_kv_group"] and len(saved["group_measured"]) == 2 * 2 * 2  # layers x KV groups x options
    text = out.read_text()
    assert "--kl-budget 100 --per-kv-group" in text and "Each KV group" in text
    written = load_policy(yaml.safe_load(text))
    for layer in (0, 1):  # the sparsest option, the same window on both groups (a call mode each)
        assert {written.choice_for(layer, head).as_dict()["local"] for head in range(4)} == {16}


def test_a_group_is_measured_alone_when_only_some_layers_are_calibrated():
    model = tiny_model()
    ids = torch.randint(1, 96, (1, 160), generator=torch.Generator().manual_seed(5))
    dense = next_token_logprobs(model, ids, 32)
    measured, _ = measure_group_kl(model, ids, load_policy(BASE), {"theta=-0.2": anchor(-0.2)}, [0],
                                   kv_group_heads(4, 2), 32, dense)
    for unit in measured:  # layer 1 (not calibrated) ran dense, not the base's anchor default
        policy = load_policy({"min_length": 0, "default": {"pattern": "dense"}, "overrides": [
            {"layers": 0, "heads": [f"{unit.heads.start}-{unit.heads.stop - 1}"], **unit.choice.as_dict(),
             "pattern": "anchor"}]})
        logprobs, _ = policy_logprobs(model, ids, policy, 32)
        assert unit.kl == pytest.approx(float(kl_per_position(dense, logprobs).mean()), rel=1e-3, abs=1e-9)
