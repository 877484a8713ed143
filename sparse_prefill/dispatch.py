"""Runs an identifier's plan on the best executor that can take it."""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from sparse_prefill.interfaces import AttentionContext, Executor, Identifier, PlanBudgetExceeded
from sparse_prefill.plan import Plan
from sparse_prefill.registry import get_registry
from sparse_prefill.validation import validate_attention_inputs

__all__ = ["NoCapableExecutorError", "default_plan_budget", "select_executor", "sparse_attention"]


class NoCapableExecutorError(RuntimeError):
    """No registered executor supports the inputs; the message lists every executor's reasons."""


def select_executor(q: torch.Tensor, plan: Plan, executors: list[Executor] | None = None) -> Executor:
    """The highest-priority executor that supports (q, plan)."""
    candidates = get_registry().executors() if executors is None else executors
    refusals = []
    for executor in candidates:
        reasons = executor.not_supported_reasons(q, plan)
        if not reasons:
            return executor
        refusals.append(f"  {executor.name}: {'; '.join(reasons)}")
    raise NoCapableExecutorError(
        f"no executor supports {type(plan).__name__} with q of shape {tuple(q.shape)}, dtype {q.dtype} "
        f"on {q.device.type}:\n" + ("\n".join(refusals) or "  (no executors registered)")
    )


# The plans alive at once may take this fraction of q, k and v's bytes (see sparse_attention).
PLAN_BUDGET_FRACTION = 0.25


def default_plan_budget(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> int:
    """Bytes the plans of one call may hold at once: PLAN_BUDGET_FRACTION of the inputs' bytes."""
    return int(PLAN_BUDGET_FRACTION * sum(t.numel() * t.element_size() for t in (q, k, v)))


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    identifier: Identifier,
    ctx: AttentionContext | None = None,
    *,
    executor: Executor | None = None,
    return_lse: bool = False,
    on_plan: Callable[[Plan, AttentionContext], None] | None = None,
    max_plan_bytes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal prefill attention over the keys ``identifier`` selects.

    q: [B, Hq, N, D]; k, v: [B, Hkv, N, D] (GQA is read in place, never expanded). Returns
    (output [B, Hq, N, D], log-sum-exp [B, Hq, N] float32 if ``return_lse``). ``on_plan``
    sees each plan before execution with the context of the heads it covers (statistics, debugging).

    Memory: a plan's size is known only once identified, and on diffuse attention a long
    sequence's key lists can outgrow q, k and v together. The identifier gets a budget
    (``max_plan_bytes``, default :func:`default_plan_budget`) in ``ctx.plan_budget``; one that
    would pass it raises :class:`PlanBudgetExceeded` with its size per KV head, and the heads
    then run in consecutive KV-group chunks that fit, each identified, executed into the shared
    output and freed before the next. Identifiers that ignore the budget run in one call.

    Equivalent PyTorch code for a plan's mask ``M`` (for testing only; O(N^2))::

        scores = (q @ k.repeat_interleave(Hq // Hkv, 1).transpose(-1, -2)) * scale
        out = scores.masked_fill(~M, -inf).softmax(-1) @ v.repeat_interleave(Hq // Hkv, 1)
    """
    validate_attention_inputs(q, k, v)
    ctx = ctx or AttentionContext.for_inputs(q, k)
    budget = default_plan_budget(q, k, v) if max_plan_bytes is None else max_plan_bytes
    try:
        plan = identifier.identify(q, k, dataclasses.replace(ctx, plan_budget=budget))
    except PlanBudgetExceeded as exceeded:
        return _run_in_chunks(q, k, v, identifier, ctx, _kv_chunks(exceeded.kv_head_bytes, budget),
                              executor=executor, return_lse=return_lse, on_plan=on_plan)
    if on_plan is not None:
        on_plan(plan, ctx)
    return _execute(q, k, v, plan, ctx, executor, return_lse)


def _kv_chunks(kv_head_bytes: list[int], budget: int) -> list[slice]:
    """Consecutive KV heads packed greedily into calls whose plans fit ``budget`` (a head over it
    alone gets a call of its own)."""
    chunks, start, size = [], 0, 0
    for head, nbytes in enumerate(kv_head_bytes):
        if head > start and size + nbytes > budget:
            chunks.append(slice(start, head))
            start, size = head, 0
        size += nbytes
    chunks.append(slice(start, len(kv_head_bytes)))
    return chunks


def _run_in_chunks(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, identifier: Identifier, ctx: AttentionContext,
    kv_chunks: list[slice], *, executor: Executor | None, return_lse: bool,
    on_plan: Callable[[Plan, AttentionContext], None] | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Identify and execute each chunk of KV heads (with its query heads) into one output; a chunk's
    plan is freed before the next is built."""
    group = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device) if return_lse else None
    for kv_heads in kv_chunks:
        q_heads = slice(kv_heads.start * group, kv_heads.stop * group)
        chunk_ctx = dataclasses.replace(
            ctx, num_q_heads=q_heads.stop - q_heads.start, num_kv_heads=kv_heads.stop - kv_heads.start,
            head_offset=ctx.head_offset + q_heads.start, plan_budget=None,
        )
        chunk_q, chunk_k, chunk_v = q[:, q_heads], k[:, kv_heads], v[:, kv_heads]
        plan = identifier.identify(chunk_q, chunk_k, chunk_ctx)
        if on_plan is not None:
            on_plan(plan, chunk_ctx)
        chunk_lse = _execute(chunk_q, chunk_k, chunk_v, plan, chunk_ctx, executor, return_lse, out=out[:, q_heads])[1]
        if lse is not None:
            lse[:, q_heads] = chunk_lse
        del plan
    return out, lse


def _execute(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: Plan, ctx: AttentionContext,
             executor: Executor | None, return_lse: bool, out: torch.Tensor | None = None,
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Runs ``plan`` on ``executor`` (or the best capable one), writing into ``out`` when given."""
    if executor is not None and (reasons := executor.not_supported_reasons(q, plan)):
        raise NoCapableExecutorError(f"executor {executor.name} cannot run these inputs: {'; '.join(reasons)}")
    chosen = executor or select_executor(q, plan)
    return chosen(q, k, v, plan, ctx, return_lse=return_lse, out=out)
