"""Block attention in Triton: each query block attends its selected key blocks, one online softmax.

Executes a :class:`~sparse_prefill.plan.BlockPlan`. The program layout is the stripe kernel's
(:mod:`sparse_prefill.kernels.attention_tiles`): a program owns ``TILE_M`` (row, head) slots of one
query block, consecutive rows each with every query head that shares the block list, stacked along
M, so with a plan per KV head each K/V tile is loaded once for every head of the GQA group. K and V
are read in place, never expanded.

Why not the stripe kernel on an expanded plan: a selected key block is ``block_size`` consecutive
keys, so every K/V tile is a plain contiguous load whose address needs only the block number (one
scalar per tile, read one iteration ahead), instead of a gather through ``BLOCK_N`` key indices.

Per program: the off-diagonal blocks of its segment (key tiles of ``BLOCK_N``, a divisor of the
block size, so every tile is whole and inside the sequence: no mask at all), then the diagonal
block if the segment holds it (the causal mask only on tiles that reach the program's first row).
A segment may hold no block (a valid plan allows it): its rows get output 0 and lse -inf, as
:func:`~sparse_prefill.kernels.reference.block_attention_reference` gives them.

Equivalent PyTorch code: :func:`sparse_prefill.kernels.reference.block_attention_reference`.
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
from sparse_prefill.plan import BlockPlan

__all__ = ["block_attention", "block_size_supported", "BLOCK_HEAD_DIMS", "BLOCK_DTYPES", "BLOCK_SIZE_MULTIPLE"]

BLOCK_HEAD_DIMS = HEAD_DIMS
BLOCK_DTYPES = DTYPES
BLOCK_SIZE_MULTIPLE = 16  # key tiles divide the block and tl.dot needs tiles of >= 16 keys


def block_size_supported(block_size: int) -> bool:
    """Whether the kernel takes this block size: any positive multiple of 16 (64 and 128 in practice)."""
    return block_size > 0 and block_size % BLOCK_SIZE_MULTIPLE == 0


# ---------------------------------------------------------------------------------------------
# Jitted helpers
# ---------------------------------------------------------------------------------------------


@triton.jit
def _selected_blocks(
    acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, Indices, seg_start, seg_end, offs_n, offs_d, d_ok,
    qk_scale, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """Key blocks Indices[seg_start:seg_end], all before the diagonal: BLOCK_SIZE // BLOCK_N whole tiles each.

    One flat loop over the tiles of all blocks (not a loop per block), so the pipeliner keeps
    num_stages tiles in flight across block boundaries. The block number of the next tile is
    read one iteration ahead, as the stripe kernel reads its indices: the K/V addresses then
    never wait on a load issued in the same iteration.
    """
    first = seg_start * (BLOCK_SIZE // BLOCK_N)  # tiles of all blocks, numbered from the segment's start
    last = seg_end * (BLOCK_SIZE // BLOCK_N)
    whole = offs_n < BLOCK_N  # all true, known at compile time
    upcoming = tl.load(Indices + seg_start, mask=first < last, other=0)
    for tile in range(first, last):
        block = upcoming.to(tl.int64)
        following = tile + 1
        upcoming = tl.load(Indices + following // (BLOCK_SIZE // BLOCK_N), mask=following < last, other=0)
        keys = block * BLOCK_SIZE + (tile % (BLOCK_SIZE // BLOCK_N)) * BLOCK_N + offs_n
        acc, m_i, l_i = key_tile(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, keys, whole, whole[None, :],
                                 offs_d, d_ok, qk_scale, False, DOT_PRECISION, UPCAST)
    return acc, m_i, l_i


# ---------------------------------------------------------------------------------------------
# Autotuning
# ---------------------------------------------------------------------------------------------


def _configs() -> list[triton.Config]:
    """Every key tile that can divide a block; pruning keeps the dividing ones. Under the interpreter,
    which cannot time, one stage (the pruning then keeps one config)."""
    if INTERPRET:
        return [triton.Config({"BLOCK_N": block_n}, num_warps=4, num_stages=1) for block_n in (16, 32, 64)]
    return [
        triton.Config({"BLOCK_N": block_n}, num_warps=warps, num_stages=stages)
        for block_n in (16, 32, 64, 128)
        for warps in (4, 8)
        for stages in (2, 3, 4)
    ]


def _prune_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Key tiles that divide the block (16 only where nothing larger does), then the shared fit rules."""
    args = {**named_args, **kwargs}
    block_size = args["BLOCK_SIZE"]
    dividing = [config for config in configs if block_size % config.kwargs["BLOCK_N"] == 0]
    if any(config.kwargs["BLOCK_N"] > 16 for config in dividing):
        dividing = [config for config in dividing if config.kwargs["BLOCK_N"] > 16]
    if INTERPRET:  # the largest dividing tile: fewest interpreted iterations, no timing
        return dividing[-1:]
    return fitting_configs(dividing, args)


# ---------------------------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------------------------


@triton.autotune(
    configs=_configs(),
    # BLOCK_SIZE decides which key tiles divide a block; length_bucket (a key only) tunes each power
    # of two of the length once, as the stripe kernel does.
    key=["HEAD_DIM", "TILE_M", "HEADS", "BLOCK_SIZE", "length_bucket"],
    prune_configs_by={"early_config_prune": _prune_configs},
)
@triton.jit
def _block_fwd(
    Q, K, V, Out, Lse, Offsets, Indices, Verdict,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    seq_len, length_bucket, num_q_heads, plan_heads, q_per_kv,
    num_blocks, tiles_per_block, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEADS: tl.constexpr, TILE_M: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, RETURN_LSE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, CHECK_VERDICT: tl.constexpr,
):
    if CHECK_VERDICT:  # as in _stripe_fwd: a pending plan whose verdict is 0 must not run
        if tl.load(Verdict) == 0:
            return
    # Which rows (last query blocks first: they may attend the most) and which heads: see program_tile.
    block, diag_start, first_slot, slot_end, r0, row_hi, pid_bh = program_tile(
        num_blocks, tiles_per_block, BLOCK_SIZE, seq_len, HEADS, TILE_M)
    if r0 >= row_hi:  # a last block shorter than its row tiles
        return
    b, hp, kv_head, q_head, row_pos, row_ok = program_heads(
        pid_bh, diag_start, first_slot, slot_end, plan_heads, q_per_kv, HEADS, TILE_M,
    )
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = load_queries(Q, b, q_head, row_pos, row_ok, stride_qb, stride_qh, stride_qn, offs_d, d_ok)
    k_base = K + b * stride_kb + kv_head * stride_kh
    v_base = V + b * stride_vb + kv_head * stride_vh

    # The segment of (b, hp, block); its list is sorted and ends at the diagonal when it holds it.
    segment = (b * plan_heads + hp) * num_blocks + block
    seg_start = tl.load(Offsets + segment)
    seg_end = tl.load(Offsets + segment + 1)
    last_block = tl.load(Indices + seg_end - 1, mask=seg_end > seg_start, other=-1)
    has_diagonal = last_block == block
    off_diagonal_end = seg_end - has_diagonal.to(tl.int64)

    acc, m_i, l_i = initial_state(TILE_M, BLOCK_D)
    acc, m_i, l_i = _selected_blocks(
        acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, Indices, seg_start, off_diagonal_end, offs_n, offs_d,
        d_ok, qk_scale, BLOCK_SIZE, BLOCK_N, DOT_PRECISION, UPCAST,
    )
    # The diagonal block [diag_start, row], causal; an empty range when the segment lacks it.
    diag_r0 = tl.where(has_diagonal, r0, diag_start)
    diag_hi = tl.where(has_diagonal, row_hi, diag_start)
    acc, m_i, l_i = causal_window(
        acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, diag_start, diag_r0, diag_hi, row_pos, offs_n, offs_d,
        d_ok, qk_scale, BLOCK_N, DOT_PRECISION, UPCAST,
    )
    store_result(acc, m_i, l_i, Out, Lse, b, q_head, row_pos, row_ok, stride_ob, stride_oh, stride_on, offs_d, d_ok,
                 num_q_heads, seq_len, RETURN_LSE)


# ---------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------


def _validate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: BlockPlan, scale: float) -> int:
    """Everything the kernel assumes, checked before launch (no host sync); returns the plan's head count."""
    if isinstance(plan, BlockPlan) and not block_size_supported(plan.block_size):  # before its CSR's length
        raise ValueError(f"block_attention supports block sizes that are multiples of {BLOCK_SIZE_MULTIPLE}, "
                         f"got {plan.block_size}; the reference executor runs any block size")
    return validate_launch("block_attention", BlockPlan, "num_blocks", q, k, v, plan, scale)


def block_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: BlockPlan,
    scale: float,
    return_lse: bool = False,
    out: torch.Tensor | None = None,
    verdict: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal attention over the key blocks a BlockPlan selects, in one Triton kernel.

    q is [B, Hq, N, D], k and v [B, Hkv, N, D] (GQA read in place); D in BLOCK_HEAD_DIMS, dtype in
    BLOCK_DTYPES, accumulation in float32; ``plan.block_size`` a multiple of 16 and ``plan.heads``
    Hq or Hkv. Returns (out [B, Hq, N, D] in q's dtype, lse [B, Hq, N] float32 natural log, or
    None); with ``out`` (q's shape and dtype, unit stride along D) the output is written there.
    The plan's sortedness and causality are not checked here (that needs a host sync):
    ``plan.validate()`` does, and the reference executor runs it. ``verdict``: as in
    :func:`~sparse_prefill.kernels.stripe_attention.stripe_attention` (nothing written when it is 0).
    """
    plan_heads = _validate(q, k, v, plan, scale)
    return launch(_block_fwd, q, k, v, plan_heads, plan.num_blocks, plan.block_size, plan.offsets, plan.indices, scale,
                  return_lse, out, verdict=verdict, BLOCK_SIZE=plan.block_size)
