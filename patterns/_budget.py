"""The plan-memory check shared by the PyTorch identifiers that list keys per plan head."""

from __future__ import annotations

import torch

from sparse_prefill.interfaces import AttentionContext, PlanBudgetExceeded


def plan_head_bytes(counts: torch.Tensor) -> torch.Tensor:
    """Bytes of each plan head's lists, on the counts' device: ``counts`` [batch, plan_heads, groups]
    entries per segment, int32 each, plus an int64 offset per segment."""
    batch, _, groups = counts.shape
    return counts.sum(dim=(0, 2)) * 4 + 8 * batch * groups


def check_plan_budget(counts: torch.Tensor, num_kv_heads: int, ctx: AttentionContext, per_query_head: bool) -> None:
    """Raise PlanBudgetExceeded before allocating key lists that would pass ``ctx.plan_budget``.

    ``counts`` [batch, plan_heads, groups] are the keys each segment will list. With
    ``per_query_head`` the plan heads are query heads, whose lists do not depend on the other heads
    of their KV group, so the dispatcher may split a group.
    """
    if ctx.plan_budget is not None:
        enforce_plan_budget(plan_head_bytes(counts).tolist(), num_kv_heads, ctx, per_query_head)


def enforce_plan_budget(head_bytes: list[int], num_kv_heads: int, ctx: AttentionContext, per_query_head: bool) -> None:
    """:func:`check_plan_budget` from each plan head's bytes already on the host."""
    if ctx.plan_budget is not None and sum(head_bytes) + 8 > ctx.plan_budget:
        raise PlanBudgetExceeded.for_plan_heads(head_bytes, num_kv_heads, ctx.plan_budget, per_query_head)
