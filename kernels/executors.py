"""The built-in executors: each binds one kernel to the Executor interface with its capabilities."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from sparse_prefill.interfaces import AttentionContext, Executor, write_into
from sparse_prefill.kernels.block_attention import BLOCK_HEAD_DIMS, block_attention, block_size_supported
from sparse_prefill.kernels.reference import (
    block_attention_reference,
    dense_attention_reference,
    stripe_attention_reference,
)
from sparse_prefill.kernels.runtime import triton_can_run
from sparse_prefill.kernels.stripe_attention import STRIPE_HEAD_DIMS, stripe_attention
from sparse_prefill.plan import BlockPlan, DensePlan, Plan, StripePlan

__all__ = ["DenseSDPAExecutor", "ReferenceExecutor", "TritonBlockExecutor", "TritonStripeExecutor"]

_ALL_DEVICES = frozenset({"cpu", "cuda", "xpu", "mps"})
# Plain PyTorch takes float64 too (a model run in float64 must not fail mid-generation).
_TORCH_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


class DenseSDPAExecutor(Executor):
    """Dense causal attention through PyTorch's SDPA (GQA read in place with enable_gqa)."""

    name = "dense-sdpa"
    plan_kinds = (DensePlan,)
    devices = _ALL_DEVICES
    dtypes = _TORCH_DTYPES
    priority = 10
    supports_backward: ClassVar[bool] = True  # SDPA and the reference (for the lse) are plain autograd ops

    def __call__(self, q, k, v, plan: Plan, ctx: AttentionContext, return_lse: bool = False, out=None):
        if return_lse:  # SDPA does not expose the log-sum-exp
            result, lse = dense_attention_reference(q, k, v, ctx.scale, return_lse=True)
            return write_into(result, out), lse
        result = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=ctx.scale, enable_gqa=q.shape[1] != k.shape[1])
        return write_into(result, out), None


class ReferenceExecutor(Executor):
    """Plain PyTorch, float32, chunked per query group or block: the correctness reference on any device."""

    name = "reference"
    plan_kinds = (StripePlan, BlockPlan)
    devices = _ALL_DEVICES
    dtypes = _TORCH_DTYPES
    priority = 0
    supports_backward: ClassVar[bool] = True  # plain autograd ops: gradients flow through the selected keys

    def __call__(self, q, k, v, plan: Plan, ctx: AttentionContext, return_lse: bool = False, out=None):
        plan.validate()  # the correctness path: a plan from a faulty identifier is an error, not an answer
        reference = stripe_attention_reference if isinstance(plan, StripePlan) else block_attention_reference
        result, lse = reference(q, k, v, plan, ctx.scale, return_lse=return_lse)
        return write_into(result, out), lse


class _TritonExecutor(Executor):
    """What the Triton plan kernels share as executors: CUDA (or the interpreter), top priority, forward only."""

    devices = frozenset({"cuda"})
    priority = 100
    supports_backward: ClassVar[bool] = False  # a forward kernel only: the dispatcher refuses inputs needing grad

    def device_supported(self, device: torch.device) -> bool:
        return triton_can_run(device)


class TritonStripeExecutor(_TritonExecutor):
    """Windows with contiguous loads plus gathered discrete keys, one online softmax (Triton)."""

    name = "triton-stripe"
    plan_kinds = (StripePlan,)
    head_dims: ClassVar[frozenset[int] | None] = frozenset(STRIPE_HEAD_DIMS)
    reads_verdict: ClassVar[bool] = True

    def __call__(self, q, k, v, plan: Plan, ctx: AttentionContext, return_lse: bool = False, out=None, verdict=None):
        return stripe_attention(q, k, v, plan, ctx.scale, return_lse=return_lse, out=out, verdict=verdict)


class TritonBlockExecutor(_TritonExecutor):
    """Selected key blocks with contiguous K/V tile loads, causal only in the diagonal block (Triton)."""

    name = "triton-block"
    plan_kinds = (BlockPlan,)
    head_dims: ClassVar[frozenset[int] | None] = frozenset(BLOCK_HEAD_DIMS)
    reads_verdict: ClassVar[bool] = True

    def not_supported_reasons(self, q: torch.Tensor, plan: Plan) -> list[str]:
        reasons = super().not_supported_reasons(q, plan)
        if isinstance(plan, BlockPlan) and not block_size_supported(plan.block_size):
            reasons.append(f"block size {plan.block_size} not a multiple of 16")
        return reasons

    def __call__(self, q, k, v, plan: Plan, ctx: AttentionContext, return_lse: bool = False, out=None, verdict=None):
        return block_attention(q, k, v, plan, ctx.scale, return_lse=return_lse, out=out, verdict=verdict)
