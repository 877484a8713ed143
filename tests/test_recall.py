"""Recall measurement: attention_recall against a dense restatement, then on real SmolLM2 Q/K (1,024 tokens).

Also: capture_qk records what the model itself computes (sliding-window layers included), and the benchmark's
report merges only results of the same model and input.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from sparse_prefill.evaluation.models import essay_token_ids, load_model
from sparse_prefill.evaluation.recall import (
    attention_recall,
    capture_qk,
    causal_probabilities,
    sampled_attention_recall,
)
from sparse_prefill.interfaces import AttentionContext
from sparse_prefill.patterns.anchor import ANCHOR
from sparse_prefill.patterns.anchor.reference import anchor_identify_reference
from sparse_prefill.plan import BlockPlan, DensePlan, StripePlan
from sparse_prefill.registry import get_pattern
from tests.plan_factories import random_block_plan

TOKENS = 1024
LAYERS = (8, 22)


def _dense_recall(q: torch.Tensor, k: torch.Tensor, plan: StripePlan | BlockPlan | DensePlan, scale: float) -> float:
    """The definition, O(N^2): full causal softmax times the plan's dense mask, averaged over rows and heads."""
    num_q, num_kv, n = q.shape[1], k.shape[1], q.shape[2]
    scores = scale * q.double() @ k.double().repeat_interleave(num_q // num_kv, dim=1).transpose(-1, -2)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    probs = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)
    heads = plan.plan_heads if isinstance(plan, StripePlan) else plan.heads
    mask = plan.to_dense().repeat_interleave(num_q // heads, dim=1) & causal
    return float((probs * mask).sum() / (q.shape[0] * num_q * n))


@pytest.mark.parametrize("share_kv_heads", [True, False], ids=["shared", "perhead"])
def test_attention_recall_matches_dense_definition(share_kv_heads: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 150, 32, generator=gen), torch.randn(2, 2, 150, 32, generator=gen)
    plan = anchor_identify_reference(
        q, k, scale=32**-0.5, theta=2.0, block=16, group_blocks=2, sink=8, local=16, share_kv_heads=share_kv_heads
    )
    assert 0.0 < attention_recall(q, k, plan, 32**-0.5) < 1.0
    assert attention_recall(q, k, plan, 32**-0.5) == pytest.approx(_dense_recall(q, k, plan, 32**-0.5), abs=1e-6)


@pytest.mark.parametrize("heads, block_size, n", [(2, 16, 150), (4, 32, 97)])
def test_attention_recall_of_block_and_dense_plans_matches_the_definition(heads: int, block_size: int, n: int) -> None:
    gen = torch.Generator().manual_seed(heads)
    q, k = torch.randn(2, 4, n, 32, generator=gen), torch.randn(2, 2, n, 32, generator=gen)
    plan = random_block_plan(2, heads, n, block_size, fraction=0.4, seed=heads)
    recall = attention_recall(q, k, plan, 32**-0.5)
    assert 0.0 < recall < 1.0
    assert recall == pytest.approx(_dense_recall(q, k, plan, 32**-0.5), abs=1e-6)
    assert attention_recall(q, k, DensePlan(2, heads, n), 32**-0.5) == 1.0


@pytest.fixture(scope="module")
def smollm2_qk() -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    model, tokenizer = load_model()
    qk = capture_qk(model, essay_token_ids(tokenizer, TOKENS), LAYERS)
    assert model.config._attn_implementation == "sdpa", "capture_qk must restore the model's attention"
    return qk


def _default_params() -> dict:
    """The pattern's defaults, measuring the selection itself (no dense fallback)."""
    return {**{name: parameter.default for name, parameter in ANCHOR.parameters.items()}, "dense_above": 1.0}


@pytest.mark.slow
def test_capture_gives_post_rope_gqa_shapes(smollm2_qk: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
    assert list(smollm2_qk) == list(LAYERS)
    for q, k in smollm2_qk.values():
        assert q.shape == (1, 9, TOKENS, 64) and k.shape == (1, 3, TOKENS, 64)


@pytest.mark.slow
def test_default_parameters_keep_most_attention_at_lower_density(
    smollm2_qk: dict[int, tuple[torch.Tensor, torch.Tensor]],
) -> None:
    for layer, (q, k) in smollm2_qk.items():
        # The selection itself: at 1k tokens the dense tail (one full 128-row group) alone would
        # cover a fifth of the causal matrix, so it is measured without it.
        plan = anchor_identify_reference(q, k, scale=0.125, **{**_default_params(), "dense_tail": 0})
        recall = attention_recall(q, k, plan, scale=0.125)
        # At 1k tokens the 128-key windows alone cover about a third of the causal matrix.
        assert 0.9 <= recall <= 1.0 and 0.2 <= plan.density() <= 0.8, f"layer {layer}: {recall=}, {plan.density()=}"


@pytest.mark.slow
def test_huge_theta_recalls_everything(smollm2_qk: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
    q, k = smollm2_qk[LAYERS[0]]
    plan = anchor_identify_reference(q, k, scale=0.125, **{**_default_params(), "theta": 1e30})
    assert plan.density() == pytest.approx(1.0)
    assert attention_recall(q, k, plan, scale=0.125) == pytest.approx(1.0, abs=1e-4)


def _tiny_gemma3() -> Gemma3ForCausalLM:
    """Random Gemma-3 whose 8-key sliding windows are much shorter than the test's 64 tokens."""
    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, sliding_window=8,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
    )
    config._attn_implementation = "sdpa"
    return Gemma3ForCausalLM(config).eval()


def _sdpa_qk(model: Gemma3ForCausalLM, ids: torch.Tensor, monkeypatch: pytest.MonkeyPatch
             ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Q/K of every layer as the model's own SDPA forward (with its own masks) sees them."""
    recorded: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def recording(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        recorded[module.layer_idx] = (query.clone(), key.clone())
        return sdpa(module, query, key, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "sdpa", recording)
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False)
    return recorded


def test_capture_matches_the_models_own_forward_with_sliding_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _tiny_gemma3()
    ids = torch.randint(0, 128, (1, 64), generator=torch.Generator().manual_seed(0))
    expected = _sdpa_qk(model, ids, monkeypatch)
    captured = capture_qk(model, ids, range(model.config.num_hidden_layers))
    assert list(captured) == list(expected) == [0, 1, 2, 3]
    for layer, (q, k) in captured.items():
        torch.testing.assert_close(q, expected[layer][0], rtol=0, atol=0, msg=f"layer {layer} queries")
        torch.testing.assert_close(k, expected[layer][1], rtol=0, atol=0, msg=f"layer {layer} keys")
    assert model.config._attn_implementation == "sdpa"


def _benchmark_module() -> Any:
    """benchmarks/recall.py, imported by path (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(
        "recall_benchmark", Path(__file__).parents[1] / "benchmarks" / "recall.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _result(theta: float) -> dict[str, Any]:
    return {"params": {"theta": theta}, "layers": {}, "mean_density": 0.1, "mean_recall": 0.9}


def test_report_merges_only_results_of_the_same_model_and_input(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write, out = _benchmark_module()._write_report, tmp_path / "report.json"
    write(out, "smollm2", 1024, [5], [_result(6.0)])
    write(out, "smollm2", 1024, [5], [_result(8.0)])
    assert [r["params"]["theta"] for r in json.loads(out.read_text())["results"]] == [6.0, 8.0]
    assert capsys.readouterr().out == ""
    write(out, "/models/gemma-3-270m.gguf", 1024, [5], [_result(7.0)])
    report = json.loads(out.read_text())
    assert report["model"] == "gemma-3-270m.gguf" and [r["params"]["theta"] for r in report["results"]] == [7.0]
    assert "overwriting" in capsys.readouterr().out


@pytest.mark.parametrize("name, params", [
    ("vertical-slash", {"vertical": 12, "slash": 9, "last_q": 16, "block": 16, "sink": 4, "local": 8}),
    ("xattention", {"block": 16, "stride": 4, "threshold": 0.5}),
    ("dense", {}),
])
def test_sampled_recall_over_every_row_is_attention_recall_and_one_window_its_rows_mean(name: str, params: dict,
                                                                                      ) -> None:
    """Windows covering every row give attention_recall (stripe, block and dense plans); one window
    gives the mean of its rows' mass inside the plan, read from the plan's dense mask."""
    generator = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 4, 200, 32, generator=generator), torch.randn(2, 2, 200, 32, generator=generator)
    scale = 32 ** -0.5
    plan = get_pattern(name).build(**params, **({} if name == "dense" else {"dense_above": 1.0})).identify(
        q, k, AttentionContext.for_inputs(q, k))
    whole = attention_recall(q, k, plan, scale)
    assert sampled_attention_recall(q, k, plan, scale, windows=5, rows=40) == pytest.approx(whole, abs=1e-9)
    mask = plan.to_dense().repeat_interleave(4 // plan.to_dense().shape[1], dim=1)[:, :, 150:200]
    probs = torch.stack([causal_probabilities(q[b], k[b], 150, 200, scale).flatten(0, 1) for b in range(2)])
    expected = float(probs.masked_fill(~mask, 0).sum(dtype=torch.float64)) / (2 * 4 * 50)
    if name == "dense":  # exactly 1 by definition; the fp32 rows' sums miss it by rounding (2.5e-9 on one CPU)
        assert expected == pytest.approx(1.0, abs=1e-6)
        expected = 1.0
    assert sampled_attention_recall(q, k, plan, scale, windows=1, rows=50) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("shared", [True, False])
def test_each_heads_recall_averages_to_the_layers_and_the_worst_is_reported(shared: bool) -> None:
    """benchmarks/recall.py --per-head: heads have equal rows, so their recalls average to attention_recall."""
    generator = torch.Generator().manual_seed(5)
    q, k = torch.randn(1, 4, 300, 32, generator=generator), torch.randn(1, 2, 300, 32, generator=generator)
    params = {"theta": 2.0, "block": 32, "group_blocks": 1, "sink": 16, "local": 16, "share_kv_heads": shared,
              "dense_tail": 0}
    result = _benchmark_module()._evaluate({7: (q, k)}, params, per_head=True)
    heads = result["layers"][7]["head_recalls"]
    assert len(heads) == 4 and sum(heads) / 4 == pytest.approx(result["mean_recall"], abs=1e-9)
    assert result["worst_head"] == {"recall": min(heads), "layer": 7, "head": heads.index(min(heads))}
    oracles = _benchmark_module()._oracles({7: (q, k)}, 0.9)
    assert 0 < oracles["mean_per_head_density"] <= 1 and 0 < oracles["mean_shared_density"] <= 1


@pytest.mark.parametrize("bad", ["0", "1.5", "x"])
def test_recall_script_refuses_an_oracle_target_outside_0_1_before_loading(bad: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=r"expected a recall in \(0, 1\]"):
        _benchmark_module()._recall_target(bad)


def test_a_policys_per_group_thetas_are_measured_as_each_group_alone(tmp_path: Path) -> None:
    """benchmarks/recall.py --policy: a layer whose KV groups take different thetas reports, per head, the
    recall of its group's own selection, and the layer's density is the mean of its groups'."""
    generator = torch.Generator().manual_seed(9)
    q, k = torch.randn(1, 4, 256, 32, generator=generator), torch.randn(1, 2, 256, 32, generator=generator)
    params = {"block": 32, "group_blocks": 1, "sink": 16, "local": 16, "share_kv_heads": True, "dense_tail": 0}
    path = tmp_path / "groups.yaml"
    path.write_text(json.dumps({"default": {"pattern": "anchor", **params, "theta": 1.0},
                                "overrides": [{"layers": 3, "heads": "2-3", "pattern": "anchor", **params,
                                               "theta": 6.0}]}))
    result = _benchmark_module()._evaluate_policy({3: (q, k)}, path)["layers"][3]
    scale = 32 ** -0.5
    densities = []
    for group, theta in ((0, 1.0), (1, 6.0)):
        heads, kv = slice(2 * group, 2 * group + 2), slice(group, group + 1)
        plan = anchor_identify_reference(q[:, heads], k[:, kv], scale=scale, theta=theta, **params)
        densities.append(plan.density())
        for head in range(2):
            alone = attention_recall(q[:, 2 * group + head:2 * group + head + 1], k[:, kv], plan, scale)
            assert result["head_recalls"][2 * group + head] == pytest.approx(alone, abs=1e-9)
    assert result["density"] == pytest.approx(sum(densities) / 2)
    assert densities[1] > densities[0]
