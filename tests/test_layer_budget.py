"""KL-budget calibration: the per-layer choice against brute force, the measurements against direct runs."""

import dataclasses
import itertools
import math
import random
from pathlib import Path

import pytest
import torch

from sparse_prefill.evaluation.layer_budget import (
    DENSE,
    LayerOption,
    calibrate_kl_budget,
    choose_within_budget,
    kl_calibrated_policy,
    layer_policy,
    worst_over_texts,
)
from sparse_prefill.evaluation.whole_model import kl_per_position, next_token_logprobs
from sparse_prefill.integrations.huggingface import apply, remove
from sparse_prefill.policy import load_policy
from tests.test_whole_model import save_tiny_model_with_char_tokenizer, tiny_model

STREAMING = {"min_length": 0, "default": {"pattern": "streaming", "sink": 8, "local": 16, "group_rows": 16}}


def random_instance(rng: random.Random, layers: int, options: int) -> list[LayerOption]:
    measured = []
    for layer in range(layers):
        measured.append(LayerOption(layer, DENSE, None, 0.0, 1.0))
        for i in range(options):
            choice = load_policy(STREAMING).default  # any choice: the solver reads only kl and density
            measured.append(LayerOption(layer, f"o{i}", choice, rng.uniform(0, 0.1), rng.uniform(0.05, 1.0)))
    return measured


def totals(chosen: dict[int, LayerOption]) -> tuple[float, float]:
    return sum(o.kl for o in chosen.values()), sum(o.density for o in chosen.values())


def brute_force(measured: list[LayerOption], budget: float) -> float:
    """The least summed density of any choice within the budget."""
    by_layer = {}
    for option in measured:
        by_layer.setdefault(option.layer, []).append(option)
    best = math.inf
    for combination in itertools.product(*by_layer.values()):
        if sum(o.kl for o in combination) <= budget:
            best = min(best, sum(o.density for o in combination))
    return best


@pytest.mark.parametrize("seed", range(40))
def test_choice_stays_within_budget_and_within_one_step_of_the_optimum(seed):
    rng = random.Random(seed)
    measured = random_instance(rng, layers=rng.randint(1, 4), options=rng.randint(1, 4))
    budget = rng.uniform(0, 0.2)
    chosen = choose_within_budget(measured, budget)
    kl, density = totals(chosen)
    assert kl <= budget + 1e-12
    assert set(chosen) == {o.layer for o in measured}
    # The greedy on convex hulls leaves at most one step's saving: any single option's saving over dense.
    largest_step = max(1.0 - o.density for o in measured)
    assert density <= brute_force(measured, budget) + largest_step + 1e-9
    # More budget never costs more density.
    assert totals(choose_within_budget(measured, budget * 2))[1] <= density + 1e-12


def test_budget_extremes():
    measured = random_instance(random.Random(0), layers=3, options=3)
    assert all(o.label == DENSE for o in choose_within_budget(measured, 0.0).values())
    cheapest = {layer: min(o.density for o in measured if o.layer == layer) for layer in range(3)}
    chosen = choose_within_budget(measured, 1e9)
    assert {layer: o.density for layer, o in chosen.items()} == cheapest
    # An option that costs no KL and saves density is taken even with no budget.
    free = LayerOption(0, "free", measured[1].choice, 0.0, 0.3)
    assert choose_within_budget([*measured, free], 0.0)[0].label == "free"
    with pytest.raises(ValueError, match="budget"):
        choose_within_budget(measured, -1.0)


def test_calibration_measures_what_direct_runs_give_and_its_policy_checks_out():
    model = tiny_model()
    ids = torch.randint(1, 96, (1, 160), generator=torch.Generator().manual_seed(1))
    base = load_policy(STREAMING)
    options = {f"local={n}": load_policy({**STREAMING, "default": {**STREAMING["default"], "local": n}}).default
               for n in (16, 48)}
    result = calibrate_kl_budget(model, ids, base, options, budget=1e9, layers=[0, 1], score_last=32)
    assert [(o.layer, o.label) for o in result.measured] == [
        (layer, label) for layer in (0, 1) for label in (DENSE, "local=16", "local=48")]
    dense = next_token_logprobs(model, ids, 32)
    for option in result.measured:  # each number is what running that one layer sparse gives
        if option.choice is None:
            assert option.kl == 0 and option.density == 1.0
            continue
        handle = apply(model, layer_policy(base, {0: None, 1: None, option.layer: option.choice}, "t"),
                       collect_stats=True)
        try:
            logprobs = next_token_logprobs(model, ids, 32)
        finally:
            remove(model)
        assert option.kl == pytest.approx(float(kl_per_position(dense, logprobs).mean()), rel=1e-3, abs=1e-9)
        assert option.density == pytest.approx(handle.stats.layer_densities()[option.layer])
        assert 0 < option.density < 1 and option.kl > 0
    # An unlimited budget takes the sparsest option everywhere; the check ran that policy whole.
    assert {o.label for o in result.chosen.values()} == {"local=16"}
    assert result.within_budget and len(result.checks) == 1
    written = load_policy_text(kl_calibrated_policy(base, result, "header"))
    assert [o.choice.as_dict()["local"] for o in written.overrides] == [16, 16]
    handle = apply(model, written)
    try:
        logprobs = next_token_logprobs(model, ids, 32)
    finally:
        remove(model)
    assert float(kl_per_position(dense, logprobs).mean()) == pytest.approx(result.checks[0].measured_kl, rel=1e-3)


def test_a_check_missed_by_a_hair_solves_for_less_than_the_failed_choice(monkeypatch):
    """Three layers at KL 0.003 each fit a budget of 0.0092; the whole model measures 3% above the sum. Scaling
    the budget by 0.0092 / 0.00927 alone would choose the same three layers at every check."""
    import sparse_prefill.evaluation.layer_budget as layer_budget

    choice = load_policy(STREAMING).default
    measured = [o for layer in range(3) for o in (LayerOption(layer, DENSE, None, 0.0, 1.0),
                                                  LayerOption(layer, "local=16", choice, 0.003, 0.5))]

    def whole_model_kl(dense, policy):  # the summed single-layer KLs, 3% more
        sparse = [layer for layer in range(3) if policy.choice_for(layer, 0).pattern != DENSE]
        return torch.tensor([1.03 * 0.003 * len(sparse)])

    monkeypatch.setattr(layer_budget, "policy_logprobs", lambda model, ids, policy, score_last: (policy, None))
    monkeypatch.setattr(layer_budget, "kl_per_position", whole_model_kl)
    result = layer_budget.choose_and_check(None, torch.zeros(1, 8), load_policy(STREAMING), measured, 0.0092,
                                           torch.zeros(1), 4)
    assert [check.predicted_kl for check in result.checks] == pytest.approx([0.009, 0.006])
    assert result.within_budget and sum(not o.dense for o in result.chosen.values()) == 2


def test_a_timed_fallback_to_dense_keeps_dense_time(monkeypatch):
    """When no check meets the budget, the dense layers it falls back to carry time 1.0 where the options were
    timed, as a dense choice within budget does."""
    import sparse_prefill.evaluation.layer_budget as layer_budget

    choice = load_policy(STREAMING).default
    measured = [o for layer in range(2) for o in (LayerOption(layer, DENSE, None, 0.0, 1.0, time=1.0),
                                                  LayerOption(layer, "local=16", choice, 0.001, 0.5, time=0.6))]
    monkeypatch.setattr(layer_budget, "policy_logprobs", lambda model, ids, policy, score_last: (policy, None))
    monkeypatch.setattr(layer_budget, "kl_per_position", lambda dense, policy: torch.tensor([1.0]))
    result = layer_budget.choose_and_check(None, torch.zeros(1, 8), load_policy(STREAMING), measured, 0.01,
                                           torch.zeros(1), 4, checks=1)  # one failed check, no smaller choice
    assert not result.within_budget
    assert all(o.dense and o.time == 1.0 for o in result.chosen.values())
    assert sorted(result.chosen) == [0, 1]


def test_a_budget_nothing_meets_leaves_every_layer_dense():
    model = tiny_model()
    ids = torch.randint(1, 96, (1, 160), generator=torch.Generator().manual_seed(2))
    base = load_policy(STREAMING)
    result = calibrate_kl_budget(model, ids, base, {"local=16": base.default}, budget=0.0, layers=[0, 1],
                                 score_last=32)
    assert all(o.label == DENSE for o in result.chosen.values())
    written = load_policy_text(kl_calibrated_policy(base, result, "header"))
    assert [o.choice.pattern for o in written.overrides] == [DENSE, DENSE]


def test_several_texts_cost_each_option_its_worst_kl_and_check_on_every_text():
    model = tiny_model()
    texts = [torch.randint(1, 96, (1, 160), generator=torch.Generator().manual_seed(seed)) for seed in (3, 4)]
    base = load_policy(STREAMING)
    options = {f"local={n}": load_policy({**STREAMING, "default": {**STREAMING["default"], "local": n}}).default
               for n in (16, 48)}
    alone = [calibrate_kl_budget(model, ids, base, options, budget=1e9, layers=[0, 1], score_last=32)
             for ids in texts]
    both = calibrate_kl_budget(model, texts, base, options, budget=1e9, layers=[0, 1], score_last=32)
    for n, option in enumerate(both.measured):
        each = [result.measured[n] for result in alone]
        assert all((o.layer, o.label) == (option.layer, option.label) for o in each)
        # Separate runs agree to float32 summation order (CPU matmuls are not bit-reproducible across runs).
        assert option.kl == pytest.approx(max(o.kl for o in each), rel=1e-3, abs=1e-9)
        assert option.density == pytest.approx(sum(o.density for o in each) / 2)
    check = both.checks[0]
    assert check.text_kls == pytest.approx((alone[0].checks[0].measured_kl, alone[1].checks[0].measured_kl))
    assert check.measured_kl == max(check.text_kls)
    # A budget between the two texts' KLs of that choice: what is written holds it on both texts.
    budget = sum(check.text_kls) / 2
    strict = calibrate_kl_budget(model, texts, base, options, budget=budget, layers=[0, 1], score_last=32)
    assert len(strict.checks[-1].text_kls) == 2
    assert not strict.within_budget or max(strict.checks[-1].text_kls) <= budget


def test_worst_over_texts_skips_a_layer_any_text_skipped():
    choice = load_policy(STREAMING).default
    first = [LayerOption(0, DENSE, None, 0.0, 1.0), LayerOption(0, "a", choice, 0.1, 0.2),
             LayerOption(1, DENSE, None, 0.0, 1.0), LayerOption(1, "a", choice, 0.3, 0.4)]
    second = [LayerOption(0, DENSE, None, 0.0, 1.0), LayerOption(0, "a", choice, 0.2, 0.4)]
    merged, skipped = worst_over_texts([(first, []), (second, [1])])
    assert skipped == [1]
    assert [(o.layer, o.label, o.kl) for o in merged] == [(0, DENSE, 0.0), (0, "a", 0.2)]
    assert merged[1].density == pytest.approx(0.3)
    with pytest.raises(ValueError, match="no texts"):
        worst_over_texts([])


def load_policy_text(text: str):
    import yaml

    assert text.startswith("# header\n")
    return load_policy(yaml.safe_load(text))


def calibrate_tiny_model(tmp_path: Path, *argv: str) -> tuple[Path, dict]:
    """`sparse-prefill calibrate` on a tiny saved model from a streaming base, 128 tokens, 16 scored: the
    policy file written (with one budget) and the record."""
    import json

    from sparse_prefill.cli import main

    save_tiny_model_with_char_tokenizer(tmp_path / "model")
    policy = tmp_path / "streaming.yaml"
    policy.write_text("default:\n  pattern: streaming\n  sink: 8\n  local: 16\n  group_rows: 16\n")
    out, record = tmp_path / "calibrated.yaml", tmp_path / "record.json"
    code = main(["calibrate", "--model", str(tmp_path / "model"), "--policy", str(policy), *argv, "--tokens", "128",
                 "--score-last", "16", "--device", "cpu", "--out", str(out), "--record", str(record)])
    assert code == 0
    return out, json.loads(record.read_text())


def test_calibrate_command_with_kl_budgets(tmp_path):
    import yaml

    _, saved = calibrate_tiny_model(tmp_path, "--kl-budget", "100", "0", "--options", "local=16,32")
    generous = load_policy(yaml.safe_load((tmp_path / "calibrated-kl100.yaml").read_text()))
    assert [(0 in o.layers, 1 in o.layers, o.choice.as_dict()["local"]) for o in generous.overrides] == [
        (True, False, 16), (False, True, 16)]
    none = load_policy(yaml.safe_load((tmp_path / "calibrated-kl0.yaml").read_text()))
    assert [o.choice.pattern for o in none.overrides] == [DENSE, DENSE]
    assert [b["budget"] for b in saved["budgets"]] == [100, 0]
    assert len(saved["budgets"][0]["measured"]) == 2 * 3  # dense and two options on each layer
    assert saved["budgets"][0]["checks"][0]["measured_kl"] > 0


def test_calibrate_command_on_several_texts(tmp_path):
    out, saved = calibrate_tiny_model(tmp_path, "--kl-budget", "100", "--options", "local=16,32",
                                      "--text-offset", "0", "300")
    assert "from tokens 0, 300" in out.read_text() and "the worst of 2 texts" in out.read_text()
    assert saved["text_offsets"] == [0, 300]
    assert len(saved["budgets"][0]["checks"][0]["text_kls"]) == 2


def test_calibration_options_may_name_other_patterns_and_each_layer_chooses_among_them(tmp_path):
    import yaml

    out, saved = calibrate_tiny_model(
        tmp_path, "--kl-budget", "100", "--options", "local=32", "--options", "anchor.theta=-0.2,0.5",
        "--options", "anchor.block=16", "--options", "anchor.sink=8", "--options", "anchor.local=16",
        "--options", "anchor.dense_above=1", "--options", "anchor.dense_tail=0")
    measured = saved["budgets"][0]["measured"]
    labels = {m["label"] for m in measured}
    assert labels == {"dense", "local=32", "anchor[theta=-0.2,block=16,sink=8,local=16,dense_above=1.0,dense_tail=0]",
                      "anchor[theta=0.5,block=16,sink=8,local=16,dense_above=1.0,dense_tail=0]"}
    by_label = {(m["layer"], m["label"]): m for m in measured}
    chosen = load_policy(yaml.safe_load(out.read_text()))
    for override in chosen.overrides:  # each layer took the least dense of its options (a generous budget)
        layer = next(at for at in (0, 1) if at in override.layers)
        options = [m for (at, _), m in by_label.items() if at == layer]
        least = min(options, key=lambda m: m["density"])
        assert override.choice.pattern == ("streaming" if least["label"] == "local=32" else
                                           "dense" if least["label"] == "dense" else "anchor")
    # anchor's 16-key window with no stripe (theta -0.2) is less dense than streaming's 32 keys
    assert {override.choice.pattern for override in chosen.overrides} == {"anchor"}


def test_default_options_for_an_anchor_base_are_its_thetas_and_xattentions_thresholds():
    # Measured on both Qwen2.5-Coder models at 32k (docs/policies.md): layers choosing XAttention where anchor's
    # pooled query misses keys kept less KL at equal prefill time than anchor alone.
    import argparse

    from sparse_prefill.cli.calibrate import kl_options

    base = load_policy({"default": {"pattern": "anchor", "local": 512}})
    options = kl_options(argparse.Namespace(options=None, policy="base.yaml"), base)
    thetas = {label: choice for label, choice in options.items() if choice.pattern == "anchor"}
    thresholds = {label: choice for label, choice in options.items() if choice.pattern == "xattention"}
    assert sorted(choice.as_dict()["theta"] for choice in thetas.values()) == [4, 6, 7.7, 10, 12]
    assert all(choice.as_dict()["local"] == 512 for choice in thetas.values())  # the base's other settings kept
    assert sorted(choice.as_dict()["threshold"] for choice in thresholds.values()) == [0.8, 0.9, 0.95]
    assert set(options) == set(thetas) | set(thresholds)


@pytest.mark.parametrize("argv, message", [
    (["--kl-budget", "-1"], "--kl-budget must be >= 0"),
    (["--kl-budget", "0.1", "--score-last", "9000"], "--score-last must be in"),
    (["--options", "theta=6"], "--options is for --kl-budget"),
    (["--kl-budget", "0.1", "--options", "gamma=0.9"], "gamma"),
    (["--kl-budget", "0.1", "--options", "nosuch.gamma=0.9"], "unknown pattern 'nosuch'"),
    (["--text-offset", "-5"], "--text-offset"),
    (["--text-offset", "0", "-5", "--kl-budget", "0.1"], "--text-offset must be >= 0"),
    (["--text-offset", "0", "4096"], "several --text-offset values are for --kl-budget"),
    (["--record", "r.json"], "--record is for"),
    (["--cost", "time"], "--cost time is for --kl-budget"),
    (["--kl-budget", "0.1", "--per-kv-group", "--cost", "time"], "--per-kv-group measures KV groups"),
    (["--kl-budget", "0.1", "--cost", "seconds"], "invalid choice"),
])
def test_calibrate_refuses_bad_kl_arguments_before_loading(tmp_path, capsys, argv, message):
    from sparse_prefill.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["calibrate", "--out", str(tmp_path / "x.yaml"), *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_a_layer_is_measured_alone_when_only_some_layers_are_calibrated():
    """Layer 1 is not calibrated: it runs dense while layer 0's options are measured, not the base's default
    (whose cost would be added to every option of layer 0)."""
    from sparse_prefill.evaluation.layer_budget import measure_layer_options

    model = tiny_model()
    ids = torch.randint(1, 96, (1, 160), generator=torch.Generator().manual_seed(4))
    base = load_policy(STREAMING)
    dense = next_token_logprobs(model, ids, 32)
    measured, _ = measure_layer_options(model, ids, base, {"local=16": base.default}, [0], 32, dense)
    (option,) = [o for o in measured if not o.dense]
    apply(model, layer_policy(base, {0: base.default, 1: None}, "t"))
    try:
        alone = float(kl_per_position(dense, next_token_logprobs(model, ids, 32)).mean())
    finally:
        remove(model)
    assert option.kl == pytest.approx(alone, rel=1e-3, abs=1e-9) and option.kl > 0


def test_apply_times_every_layers_attention_call_when_asked():
    model = tiny_model()
    ids = torch.randint(1, 96, (1, 160), generator=torch.Generator().manual_seed(5))
    # Layer 1 dense by the policy: the model's own attention is timed too (it is what a sparse layer replaces).
    handle = apply(model, layer_policy(load_policy(STREAMING), {1: None}, "t"), time_calls=True)
    try:
        next_token_logprobs(model, ids, 8)
        seconds = handle.stats.layer_seconds()
        assert set(seconds) == {0, 1} and all(s > 0 for s in seconds.values())
        next_token_logprobs(model, ids, 8)  # a second forward adds its calls
        assert all(handle.stats.layer_seconds()[layer] > seconds[layer] for layer in (0, 1))
        handle.stats.reset()
        assert handle.stats.layer_seconds() == {}
    finally:
        remove(model)
    untimed = apply(model, load_policy(STREAMING))
    try:
        next_token_logprobs(model, ids, 8)
        assert untimed.stats.layer_seconds() == {}  # nothing is bracketed unless asked
    finally:
        remove(model)


def test_timed_choice_spends_time_not_density():
    """Two settings of equal KL: the sparser one is slower (a costlier identification). By density the sparser
    wins, by time the faster; a setting slower than dense attention is never taken, however sparse."""
    choice = load_policy(STREAMING).default
    sparse_slow = LayerOption(0, "sparse-slow", choice, 0.01, 0.2, time=0.6)
    denser_fast = LayerOption(0, "denser-fast", choice, 0.01, 0.3, time=0.4)
    untimed = [LayerOption(0, DENSE, None, 0.0, 1.0), *(dataclasses.replace(o, time=None)
                                                       for o in (sparse_slow, denser_fast))]
    assert choose_within_budget(untimed, 0.05)[0].label == "sparse-slow"
    timed = [LayerOption(0, DENSE, None, 0.0, 1.0, time=1.0), sparse_slow, denser_fast]
    assert choose_within_budget(timed, 0.05)[0].label == "denser-fast"
    slower_than_dense = LayerOption(0, "slower", choice, 0.0, 0.1, time=1.05)
    assert choose_within_budget([timed[0], slower_than_dense], 1.0)[0].label == DENSE
    # Several texts: the worst KL, the mean time.
    merged, _ = worst_over_texts([([sparse_slow], []), ([dataclasses.replace(sparse_slow, kl=0.02, time=0.8)], [])])
    assert merged[0].kl == 0.02 and merged[0].time == pytest.approx(0.7)


def test_timed_measurement_gives_each_option_its_time_over_dense():
    from sparse_prefill.evaluation.layer_budget import measure_layer_options

    model = tiny_model()
    ids = torch.randint(1, 96, (1, 160), generator=torch.Generator().manual_seed(6))
    base = load_policy(STREAMING)
    reference = next_token_logprobs(model, ids, 16)
    measured, skipped = measure_layer_options(model, ids, base, {"streaming": base.default}, [0, 1], 16, reference,
                                              timed=True)
    assert not skipped
    assert [(o.layer, o.label) for o in measured] == [(0, DENSE), (0, "streaming"), (1, DENSE), (1, "streaming")]
    for option in measured:
        assert option.time is not None and option.time > 0 and math.isfinite(option.time)
        assert option.cost == option.time
        if option.dense:
            assert option.time == 1.0
    untimed, _ = measure_layer_options(model, ids, base, {"streaming": base.default}, [0], 16, reference)
    assert all(o.time is None and o.cost == o.density for o in untimed)
    # The same KL and density either way: timing runs its own forward.
    assert [(o.kl, o.density) for o in untimed] == [(o.kl, o.density) for o in measured if o.layer == 0]


def test_calibrate_command_with_cost_time_writes_times(tmp_path):
    out, saved = calibrate_tiny_model(tmp_path, "--kl-budget", "100", "--options", "local=16,32", "--cost", "time")
    assert saved["cost"] == "time" and saved["device"] == "cpu"
    assert all(m["time"] > 0 for m in saved["budgets"][0]["measured"])
    assert saved["budgets"][0]["checks"][0]["mean_time"] > 0
    assert "least mean attention time (timed on cpu)" in out.read_text()
    _, by_density = calibrate_tiny_model(tmp_path, "--kl-budget", "100", "--options", "local=16,32")
    assert by_density["cost"] == "density"  # auto on the CPU: its times are not the GPU's
    assert all("time" not in m for m in by_density["budgets"][0]["measured"])
