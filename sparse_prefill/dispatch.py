"""Runs an identifier's plan on the best executor that can take it."""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from sparse_prefill.interfaces import AttentionContext, Executor, Identifier
from sparse_prefill.plan import Plan, plan_nbytes
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
    sequence's key lists can outgrow q, k and v together. So heads run in chunks of whole KV
    groups, each identified, executed into the shared output and freed before the next: first
    one KV head, then as many as ``max_plan_bytes`` (default :func:`default_plan_budget`) holds
    at the largest plan size per KV head seen so far.

    Equivalent PyTorch code for a plan's mask ``M`` (for testing only; O(N^2))::

        scores = (q @ k.repeat_interleave(Hq // Hkv, 1).transpose(-1, -2)) * scale
        out = scores.masked_fill(~M, -inf).softmax(-1) @ v.repeat_interleave(Hq // Hkv, 1)
    """
    validate_attention_inputs(q, k, v)
    ctx = ctx or AttentionContext.for_inputs(q, k)
    budget = default_plan_budget(q, k, v) if max_plan_bytes is None else max_plan_bytes
    num_kv, group = k.shape[1], q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device) if return_lse else None
    kv_start, bytes_per_kv_head = 0, 0
    while kv_start < num_kv:
        kv_count = 1 if kv_start == 0 else max(1, min(num_kv - kv_start, budget // max(bytes_per_kv_head, 1)))
        kv_heads = slice(kv_start, kv_start + kv_count)
        q_heads = slice(kv_start * group, (kv_start + kv_count) * group)
        chunk_ctx = dataclasses.replace(
            ctx, num_q_heads=kv_count * group, num_kv_heads=kv_count, head_offset=ctx.head_offset + q_heads.start
        )
        plan = identifier.identify(q[:, q_heads], k[:, kv_heads], chunk_ctx)
        if on_plan is not None:
            on_plan(plan, chunk_ctx)
        bytes_per_kv_head = max(bytes_per_kv_head, -(-plan_nbytes(plan) // kv_count))
        chunk_lse = _execute(q[:, q_heads], k[:, kv_heads], v[:, kv_heads], plan, chunk_ctx, executor, return_lse,
                             out[:, q_heads])
        if lse is not None:
            lse[:, q_heads] = chunk_lse
        del plan
        kv_start += kv_count
    return out, lse


def _execute(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: Plan, ctx: AttentionContext,
             executor: Executor | None, return_lse: bool, out: torch.Tensor) -> torch.Tensor | None:
    """Runs ``plan`` on ``executor`` (or the best capable one), writing into ``out``; returns the lse."""
    if executor is not None and (reasons := executor.not_supported_reasons(q, plan)):
        raise NoCapableExecutorError(f"executor {executor.name} cannot run these inputs: {'; '.join(reasons)}")
    chosen = executor or select_executor(q, plan)
    return chosen(q, k, v, plan, ctx, return_lse=return_lse, out=out)[1]
