"""Runs an identifier's plan on the best executor that can take it."""

from __future__ import annotations

from typing import Callable

import torch

from sparse_prefill.interfaces import AttentionContext, Executor, Identifier
from sparse_prefill.plan import Plan
from sparse_prefill.registry import get_registry
from sparse_prefill.validation import validate_attention_inputs

__all__ = ["NoCapableExecutorError", "select_executor", "sparse_attention"]


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


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    identifier: Identifier,
    ctx: AttentionContext | None = None,
    *,
    executor: Executor | None = None,
    return_lse: bool = False,
    on_plan: Callable[[Plan], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal prefill attention over the keys ``identifier`` selects.

    q: [B, Hq, N, D]; k, v: [B, Hkv, N, D] (GQA is read in place, never expanded). Returns
    (output [B, Hq, N, D], log-sum-exp [B, Hq, N] float32 if ``return_lse``). ``on_plan``
    sees each plan before execution (statistics, debugging).

    Equivalent PyTorch code for a plan's mask ``M`` (for testing only; O(N^2))::

        scores = (q @ k.repeat_interleave(Hq // Hkv, 1).transpose(-1, -2)) * scale
        out = scores.masked_fill(~M, -inf).softmax(-1) @ v.repeat_interleave(Hq // Hkv, 1)
    """
    validate_attention_inputs(q, k, v)
    ctx = ctx or AttentionContext.for_inputs(q, k)
    plan = identifier.identify(q, k, ctx)
    if on_plan is not None:
        on_plan(plan)
    chosen = executor or select_executor(q, plan)
    if executor is not None and (reasons := executor.not_supported_reasons(q, plan)):
        raise NoCapableExecutorError(f"executor {executor.name} cannot run these inputs: {'; '.join(reasons)}")
    return chosen(q, k, v, plan, ctx, return_lse=return_lse)
