"""The plan-memory check shared by the PyTorch identifiers that list keys per plan head."""

from __future__ import annotations

import torch

from sparse_prefill.interfaces import AttentionContext, PlanBudgetExceeded


def check_plan_budget(counts: torch.Tensor, num_kv_heads: int, ctx: AttentionContext, per_query_head: bool) -> None:
    """Raise PlanBudgetExceeded before allocating key lists that would pass ``ctx.plan_budget``.

    ``counts`` [batch, plan_heads, groups] are the keys each segment will list (int32 each, plus an
    int64 offset per segment). With ``per_query_head`` the plan heads are query heads, whose lists
    do not depend on the other heads of their KV group, so the dispatcher may split a group.
    """
    if ctx.plan_budget is None:
        return
    batch, _, groups = counts.shape
    plan_head_bytes = (counts.sum(dim=(0, 2)) * 4 + 8 * batch * groups).tolist()
    if sum(plan_head_bytes) + 8 > ctx.plan_budget:
        raise PlanBudgetExceeded.for_plan_heads(plan_head_bytes, num_kv_heads, ctx.plan_budget, per_query_head)
