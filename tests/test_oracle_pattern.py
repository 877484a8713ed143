"""The `oracle` pattern: the stripe oracle (evaluation.recall) as an identifier that whole-model runs can use."""

import pytest
import torch

from sparse_prefill import get_pattern, load_policy, sparse_attention
from sparse_prefill.evaluation.recall import attention_recall, causal_probabilities
from sparse_prefill.plugin import AttentionContext, PlanBudgetExceeded
from tests.plan_factories import masked_attention


def _inputs(seed: int, n: int = 300) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    q = 2 * torch.randn(1, 4, n, 16, generator=generator)  # peaked enough that the oracle drops keys
    k, v = (2 * torch.randn(1, 2, n, 16, generator=generator) for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("share_kv_heads", [True, False])
def test_every_block_keeps_the_target_and_the_output_is_attention_over_the_plan(share_kv_heads: bool) -> None:
    q, k, v = _inputs(1)
    target, block = 0.9, 32
    identifier = get_pattern("oracle").build(recall=target, block=block, sink=8, share_kv_heads=share_kv_heads)
    ctx = AttentionContext.for_inputs(q, k, dense_fallback=False)
    plan = identifier.identify(q, k, ctx)
    assert plan.plan_heads == (2 if share_kv_heads else 4)
    assert plan.density() < 0.9  # it selects: not every key
    mask = plan.to_dense()  # [B, plan heads, N, N]
    per_q_head = mask.repeat_interleave(2, dim=1) if share_kv_heads else mask
    for start in range(0, q.shape[2], block):
        probs = causal_probabilities(q[0], k[0], start, min(start + block, q.shape[2]), ctx.scale).flatten(0, 1)
        kept = (probs * per_q_head[0, :, start:start + block, : probs.shape[-1]]).sum(-1)  # [Hq, rows]
        # shared lists reach the target over the group's rows and heads together, per-head lists per head
        groups = kept.unflatten(0, (2, 2)).flatten(1) if share_kv_heads else kept
        assert (groups.mean(-1) >= target - 1e-5).all()
    out, _ = sparse_attention(q, k, v, identifier, ctx)
    expected, _ = masked_attention(q, k, v, mask, ctx.scale)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_a_higher_target_keeps_more_and_recall_one_is_dense_attention() -> None:
    q, k, v = _inputs(2)
    ctx = AttentionContext.for_inputs(q, k, dense_fallback=False)
    plans = [get_pattern("oracle").build(recall=r).identify(q, k, ctx) for r in (0.8, 0.95)]
    assert plans[0].density() < plans[1].density()
    assert attention_recall(q, k, plans[0], ctx.scale) < attention_recall(q, k, plans[1], ctx.scale)
    everything = get_pattern("oracle").build(recall=1.0, block=32, sink=8)
    out, _ = sparse_attention(q, k, v, everything, ctx)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                             is_causal=True)
    torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("recall", [0, -0.1, 1.5])
def test_a_recall_outside_zero_to_one_is_refused_naming_the_parameter(recall: float) -> None:
    with pytest.raises(ValueError, match="recall"):
        load_policy({"min_length": 0, "default": {"pattern": "oracle", "recall": recall}})


@pytest.mark.parametrize("share_kv_heads", [True, False])
def test_a_plan_over_the_budget_is_split_by_heads_and_gives_the_same_output(share_kv_heads: bool) -> None:
    q, k, v = _inputs(3)
    identifier = get_pattern("oracle").build(recall=0.9, block=32, sink=8, share_kv_heads=share_kv_heads)
    whole_ctx = AttentionContext.for_inputs(q, k, dense_fallback=False)
    whole = identifier.identify(q, k, whole_ctx)
    budget = int(whole.counts().sum()) * 4 // 2 + 8 * whole.counts().numel()  # about half of the lists
    tight = AttentionContext.for_inputs(q, k, dense_fallback=False, plan_budget=budget)
    with pytest.raises(PlanBudgetExceeded):
        identifier.identify(q, k, tight)
    expected, _ = sparse_attention(q, k, v, identifier, whole_ctx)
    out, _ = sparse_attention(q, k, v, identifier, tight)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
