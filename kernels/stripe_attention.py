"""Stripe attention in Triton: dense windows plus gathered discrete keys, one online softmax.

Executes a :class:`~sparse_prefill.plan.StripePlan`. A program owns ``TILE_M`` (row, head) slots
of one query group, stacked along M: consecutive rows, each with every query head that shares the
group's key list (``attention_tiles.program_tile``). With a plan per KV head (``plan_heads == Hkv``)
the heads of a GQA group share the list, so each K/V tile, contiguous or gathered, is loaded once
and multiplies all of them (Llama 32q/8kv: 4 heads x 32 rows = 128; Qwen2.5 14q/2kv: 7 heads x
about 18 rows, no padding). With a plan per query head a tile is 128 rows of one head. K and V
are read in place, never expanded.

Per program, in order: the initial window ``[0, sink_end)`` (contiguous), the group's selected
keys (gathered by index, ``BLOCK_N`` per tile), the local window ``[local_start, row]``
(contiguous; the causal mask only on tiles that reach the program's first row).

Equivalent PyTorch code: :func:`sparse_prefill.kernels.reference.stripe_attention_reference`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparse_prefill.kernels.attention_tiles import (
    DTYPES,
    HEAD_DIMS,
    INTERPRET,
    causal_window,
    contiguous_window,
    fitting_configs,
    initial_state,
    key_tile,
    launch,
    load_queries,
    program_heads,
    program_tile,
    store_result,
    validate_launch,
)
from sparse_prefill.plan import StripePlan

__all__ = ["stripe_attention", "STRIPE_HEAD_DIMS", "STRIPE_DTYPES"]

STRIPE_HEAD_DIMS = HEAD_DIMS
STRIPE_DTYPES = DTYPES


# ---------------------------------------------------------------------------------------------
# Jitted helpers
# ---------------------------------------------------------------------------------------------


@triton.jit
def _gathered_keys(
    acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, Indices, seg_start, seg_end, offs_n, offs_d, d_ok,
    qk_scale, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """Selected keys Indices[seg_start:seg_end], BLOCK_N per tile, K and V rows loaded by index.

    Whole tiles run without masks; only a last, partial tile masks its missing slots. The next
    tile's indices are loaded one iteration ahead: with the index load in the same iteration,
    Triton's pipeliner waits for every copy in flight before each tile (``async_wait {num = 0}``
    in the TTGIR), so the gather's latency was never hidden; with it ahead, the K/V copies of the
    next tile stay in flight during this one.
    """
    full_end = seg_start + (seg_end - seg_start) // BLOCK_N * BLOCK_N
    whole = offs_n < BLOCK_N  # all true, known at compile time
    upcoming = tl.load(Indices + seg_start + offs_n, mask=seg_start + offs_n < full_end, other=0)
    for slot0 in range(seg_start, full_end, BLOCK_N):
        keys = upcoming.to(tl.int64)
        following = slot0 + BLOCK_N + offs_n
        upcoming = tl.load(Indices + following, mask=following < full_end, other=0)
        acc, m_i, l_i = key_tile(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, keys, whole, whole[None, :],
                                 offs_d, d_ok, qk_scale, False, DOT_PRECISION, UPCAST)
    if full_end < seg_end:
        slots = full_end + offs_n
        slot_ok = slots < seg_end
        keys = tl.load(Indices + slots, mask=slot_ok, other=0).to(tl.int64)
        acc, m_i, l_i = key_tile(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, keys, slot_ok,
                                 slot_ok[None, :], offs_d, d_ok, qk_scale, True, DOT_PRECISION, UPCAST)
    return acc, m_i, l_i


# ---------------------------------------------------------------------------------------------
# Autotuning
# ---------------------------------------------------------------------------------------------


def _configs() -> list[triton.Config]:
    """Smallest first (the pruning fallback); one config under the interpreter, which cannot time."""
    if INTERPRET:
        return [triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_N": block_n}, num_warps=warps, num_stages=stages)
        for block_n in (32, 64, 128)
        for warps in (4, 8)
        for stages in (2, 3, 4)
    ]


def _prune_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drop configs that cannot fit or cannot pay off for this tile shape and dtype."""
    return fitting_configs(configs, {**named_args, **kwargs})


# ---------------------------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------------------------


@triton.autotune(
    configs=_configs(),
    # The autotuner adds the tensors' dtypes itself. length_bucket (a key only, unused in the body):
    # the best tile differs between short and long prompts (BLOCK_N 32 with 4 warps at 16k, 64 with
    # 8 warps at 128k on the H200), so each power of two of the length is tuned once. A new bucket
    # re-times the compiled binaries; it compiles only where an integer argument is in a
    # divisible-by-16 class not seen before (benchmarks/compile_check.py).
    key=["HEAD_DIM", "TILE_M", "HEADS", "length_bucket"],
    prune_configs_by={"early_config_prune": _prune_configs},
)
@triton.jit
def _stripe_fwd(
    Q, K, V, Out, Lse, Offsets, Indices, Verdict,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    seq_len, length_bucket, num_q_heads, plan_heads, q_per_kv,
    num_groups, tiles_per_group, group_rows, sink, local, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEADS: tl.constexpr, TILE_M: tl.constexpr,
    BLOCK_N: tl.constexpr, RETURN_LSE: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    CHECK_VERDICT: tl.constexpr,
):
    if CHECK_VERDICT:  # a plan queued before its size was read (PendingPlan): 0 means it must not run
        if tl.load(Verdict) == 0:
            return
    # Which rows (last groups first: the dense tail keeps all keys) and which heads: see program_tile.
    group, group_start, first_slot, slot_end, r0, row_hi, pid_bh = program_tile(
        num_groups, tiles_per_group, group_rows, seq_len, HEADS, TILE_M)
    if r0 >= row_hi:  # a last group shorter than its tiles
        return
    b, hp, kv_head, q_head, row_pos, row_ok = program_heads(
        pid_bh, group_start, first_slot, slot_end, plan_heads, q_per_kv, HEADS, TILE_M,
    )
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = load_queries(Q, b, q_head, row_pos, row_ok, stride_qb, stride_qh, stride_qn, offs_d, d_ok)
    k_base = K + b * stride_kb + kv_head * stride_kh
    v_base = V + b * stride_vb + kv_head * stride_vh

    # Group geometry, as StripePlan.group_bounds; the segment of (b, hp, group) in the CSR.
    local_start = tl.maximum(group_start - local, 0)
    sink_end = tl.minimum(sink, local_start)
    segment = (b * plan_heads + hp) * num_groups + group
    seg_start = tl.load(Offsets + segment)
    seg_end = tl.load(Offsets + segment + 1)

    acc, m_i, l_i = initial_state(TILE_M, BLOCK_D)
    acc, m_i, l_i = contiguous_window(
        acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, 0, sink_end, row_pos, offs_n, offs_d, d_ok,
        qk_scale, BLOCK_N, False, True, DOT_PRECISION, UPCAST,
    )
    acc, m_i, l_i = _gathered_keys(
        acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, Indices, seg_start, seg_end, offs_n, offs_d, d_ok,
        qk_scale, BLOCK_N, DOT_PRECISION, UPCAST,
    )
    # Local window [local_start, row], causal.
    acc, m_i, l_i = causal_window(
        acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, local_start, r0, row_hi, row_pos, offs_n, offs_d,
        d_ok, qk_scale, BLOCK_N, DOT_PRECISION, UPCAST,
    )

    store_result(acc, m_i, l_i, Out, Lse, b, q_head, row_pos, row_ok, stride_ob, stride_oh, stride_on, offs_d, d_ok,
                 num_q_heads, seq_len, RETURN_LSE)


# ---------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------


def stripe_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: StripePlan,
    scale: float,
    return_lse: bool = False,
    out: torch.Tensor | None = None,
    verdict: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal attention over the keys a StripePlan selects, in one Triton kernel.

    q is [B, Hq, N, D], k and v [B, Hkv, N, D] (GQA read in place); D in STRIPE_HEAD_DIMS, dtype
    in STRIPE_DTYPES, accumulation in float32. ``plan.plan_heads`` is Hq or Hkv. Returns
    (out [B, Hq, N, D] in q's dtype, lse [B, Hq, N] float32 natural log, or None); with ``out``
    (q's shape and dtype, unit stride along D, any other strides) the output is written there.
    ``verdict`` (int32, one element, on q's device; see :class:`~sparse_prefill.plan.PendingPlan`):
    every program reads it first and writes nothing when it is 0, so a plan can be launched before
    the host knows whether it holds.
    """
    # shape constraints
    plan_heads = validate_launch("stripe_attention", StripePlan, "num_groups", q, k, v, plan, scale)
    return launch(_stripe_fwd, q, k, v, plan_heads, plan.num_groups, plan.group_rows, plan.offsets, plan.indices, scale,
                  return_lse, out, unit_args=(plan.group_rows, plan.sink, plan.local), verdict=verdict)
