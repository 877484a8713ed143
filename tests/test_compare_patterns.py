"""benchmarks/compare_patterns.py on tiny Q/K: stripe and block plans measured alike, per head and worst head."""

import torch

from benchmark_scripts import load_benchmark
from sparse_prefill.evaluation.recall import attention_recall, head_recalls
from sparse_prefill.interfaces import AttentionContext
from sparse_prefill.registry import get_pattern


def _qk(seed: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return {layer: (torch.randn(1, 4, 512, 16, generator=gen) * 2, torch.randn(1, 2, 512, 16, generator=gen) * 2)
            for layer in (0, 3)}


def test_results_hold_each_heads_recall_and_the_worst_for_stripe_and_block_plans():
    compare = load_benchmark("compare_patterns")
    qk = _qk(0)
    for name, params in (("anchor", {"theta": 2.0, "block": 32, "sink": 16, "local": 16}), ("xattention", {"threshold": 0.5, "block": 32})):
        result = compare._evaluate(name, params, qk)
        identifier = get_pattern(name).build(**params)
        worst = 1.0
        for layer, (q, k) in qk.items():
            ctx = AttentionContext.for_inputs(q, k, dense_fallback=False)
            plan = identifier.identify(q, k, ctx)
            heads = head_recalls(q, k, [plan], ctx.scale)[0]
            measured = result["layers"][layer]
            assert measured["head_recalls"] == heads.tolist()
            assert abs(measured["recall"] - attention_recall(q, k, plan, ctx.scale)) < 1e-9
            assert measured["density"] == plan.density() < 1.0
            worst = min(worst, float(heads.min()))
        assert result["worst_head_recall"] == worst <= result["mean_recall"] <= 1.0
