"""EXPERIMENT, not wired in: warp-specialised stripe attention for Hopper (sm_90) in Gluon.

Same contract and program layout as :mod:`sparse_prefill.kernels.stripe_attention` (one program:
128 stacked rows, ``HEAD_TILE`` query heads x ``ROWS`` rows; the initial window, the group's
selected keys and the local window as one sequence of 64-key tiles), split into three partitions:

* two consumer warpgroups, each owning 64 of the rows (its own softmax state and accumulator);
* one producer warpgroup that loads each tile's row numbers and gathers its K/V rows by
  ``cp.async`` into a ``STAGES``-deep ring.

A ring slot is "ready" when the producer's copies land (``cp.async.mbarrier.arrive``) and "empty"
when both consumers released it, so the consumers never meet at a CTA barrier and one's softmax
can run while the other's MMAs do. Options measured with it: ``OVERLAP`` (FlashAttention-3's
intra-warpgroup order: S(t) and PV(t-1) in flight together, P through shared memory) and
``PINGPONG`` (the consumers pass a token so that their MMAs alternate).

H200, real-calibrated plans, ``benchmarks/executor_ab.py`` against the Triton kernel in the same
process, five runs (docs/benchmarks/speed.md, "Warp specialisation"): 3-5% faster at 128k in every
run (21.48-22.08 vs 22.47-22.96 ms; 73.5-75.8% of SDPA's rate, median 74.4%, against 70.5-73.0%),
1-2% at 32k-64k, 3% slower at 16k (one run), same output error. ``OVERLAP``, ``PINGPONG`` (alone
and together), 3 or 5 stages, 128-key tiles, row numbers loaded a tile ahead and a persistent grid
did not add to it.

Not shipped: Gluon cannot run under TRITON_INTERPRET, so CI could only compile it, never compare it
with the reference; its API moves between releases (``gl.thread_barrier`` used here with triton 3.6
is gone in 3.9); and the gain does not clear the 75% target reliably. Kept in the history;
removed from the tree in the next commit.

To A/B it, a wrapper module with ``stripe_attention(q, k, v, plan, scale)`` that validates as the
Triton launcher does, computes ``_tile_shape`` and calls :func:`launch`, passed to
``executor_ab.py --kernel ws=wrapper.py``.
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    async_copy,
    fence_async_shared,
    mbarrier,
    warpgroup_mma,
    warpgroup_mma_wait,
)

# Module constants, not autotuned: the A/B wrappers set them per variant before the first launch.
HEAD_DIM = 128
BLOCK_M = 128
BLOCK_N = 64
STAGES = 4
PINGPONG = False
OVERLAP = False
PRODUCER_WARPS = 4
CONSUMER_REGS = 168
PRODUCER_REGS = 56


@gluon.jit
def _tile_span(t, n_sink, n_gathered, sink_end, local_start, row_hi, seg_start, seg_end, BLOCK_N: gl.constexpr):
    gathered = (t >= n_sink) & (t < n_sink + n_gathered)
    is_sink = t < n_sink
    window_first = gl.where(is_sink, t * BLOCK_N, local_start + (t - n_sink - n_gathered) * BLOCK_N)
    window_end = gl.where(is_sink, sink_end, row_hi)
    first = gl.where(gathered, seg_start + (t - n_sink).to(gl.int64) * BLOCK_N, window_first.to(gl.int64))
    end = gl.where(gathered, seg_end, window_end.to(gl.int64))
    return gathered, first, end


@gluon.jit
def _tile_keys(t, n_tiles, n_sink, n_gathered, sink_end, local_start, row_hi, Indices, seg_start, seg_end, offs_n,
               BLOCK_N: gl.constexpr):
    """K/V row numbers of tile t (int64) and which slots hold a key; all empty past the last tile."""
    gathered, first, end = _tile_span(t, n_sink, n_gathered, sink_end, local_start, row_hi, seg_start, seg_end,
                                      BLOCK_N)
    span = first + offs_n
    key_ok = (span < end) & (t < n_tiles)
    picked = gl.load(Indices + span, mask=key_ok & gathered, other=0)
    return gl.where(gathered, picked.to(gl.int64), span), key_ok


@gluon.jit
def _producer(k_ring, v_ring, ready, empty, K, V, Indices, stride_kn, stride_vn, n_tiles, n_sink, n_gathered,
              sink_end, local_start, row_hi, seg_start, seg_end,
              HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, WARPS: gl.constexpr):
    ld_layout: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[2, 16],
                                               warps_per_cta=[WARPS, 1], order=[1, 0])
    offs_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, ld_layout))
    offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, ld_layout))
    for t in range(n_tiles):
        slot = t % STAGES
        keys, key_ok = _tile_keys(t, n_tiles, n_sink, n_gathered, sink_end, local_start, row_hi, Indices, seg_start,
                                  seg_end, offs_n, BLOCK_N)
        keys = keys[:, None]
        key_ok = key_ok[:, None]
        # The slot is free once both consumers released its previous tile (a fresh barrier passes phase 1).
        mbarrier.wait(empty.index(slot), ((t // STAGES) & 1) ^ 1)
        async_copy.async_copy_global_to_shared(k_ring.index(slot), K + keys * stride_kn + offs_d[None, :], mask=key_ok)
        async_copy.async_copy_global_to_shared(v_ring.index(slot), V + keys * stride_vn + offs_d[None, :], mask=key_ok)
        async_copy.mbarrier_arrive(ready.index(slot), increment_count=False)


@gluon.jit
def _probs(s, m_i, l_i, t, n_sink, n_gathered, sink_end, local_start, row_hi, seg_start, seg_end, r0, offs_n, row_pos,
           qk_scale, dtype: gl.constexpr, BLOCK_N: gl.constexpr):
    """Tile t's raw scores folded into the running max and sum: (P in 16 bits, alpha, max, sum)."""
    gathered, first, end = _tile_span(t, n_sink, n_gathered, sink_end, local_start, row_hi, seg_start, seg_end,
                                      BLOCK_N)
    needs_mask = (first + BLOCK_N > end) | ((t >= n_sink + n_gathered) & (first + BLOCK_N > r0))
    s = s * qk_scale
    if needs_mask:
        filled = (end - first).to(gl.int32)
        key = gl.where(gathered, 0, first.to(gl.int32) + offs_n)
        visible = (key[None, :] <= row_pos[:, None]) & (offs_n < filled)[None, :]
        s = gl.where(visible, s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, axis=1))
    alpha = gl.exp2(m_i - m_new)
    p = gl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + gl.sum(p, axis=1)
    return p.to(dtype), alpha, m_new, l_i


@gluon.jit
def _consumer(half, q_smem, k_ring, v_ring, p_ring, ready, empty, turn, Out, Lse, stride_ob, stride_oh, stride_on,
              b, first_head, head_base, heads_per_plan, num_q_heads, seq_len, r0, row_hi, n_tiles, n_sink, n_gathered,
              sink_end, local_start, seg_start, seg_end, qk_scale,
              HEAD_DIM: gl.constexpr, ROWS: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
              PINGPONG: gl.constexpr, OVERLAP: gl.constexpr, RETURN_LSE: gl.constexpr):
    HALF_M: gl.constexpr = 64
    dtype: gl.constexpr = q_smem.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    rows_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    rows_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    q_half = q_smem.slice(half * HALF_M, HALF_M)
    m_in_tile = half * HALF_M + gl.arange(0, HALF_M, layout=rows_s)
    row_pos = r0 + m_in_tile % ROWS
    offs_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    m_i = gl.full([HALF_M], -1.0e30, gl.float32, rows_s)
    l_i = gl.zeros([HALF_M], gl.float32, rows_s)
    acc = gl.zeros([HALF_M, HEAD_DIM], gl.float32, o_layout)
    zeros_s = gl.zeros([HALF_M, BLOCK_N], gl.float32, s_layout)
    if OVERLAP:
        # FlashAttention-3's order: S(t) and PV(t-1) in flight together, the softmax of S(t) while
        # PV(t-1) runs. P goes through this warpgroup's own two shared-memory buffers, so no
        # register of an MMA in flight is ever reused.
        mbarrier.wait(ready.index(0), 0)
        fence_async_shared()
        if PINGPONG:
            mbarrier.wait(turn.index(half), 0)
        s = warpgroup_mma(q_half, k_ring.index(0).permute((1, 0)), zeros_s, use_acc=False, is_async=True)
        if PINGPONG:
            mbarrier.arrive(turn.index(1 - half))
        s = warpgroup_mma_wait(0, deps=(s, ))
        p, alpha, m_i, l_i = _probs(s, m_i, l_i, 0, n_sink, n_gathered, sink_end, local_start, row_hi, seg_start,
                                    seg_end, r0, offs_n, row_pos, qk_scale, dtype, BLOCK_N)
        p_ring.index(2 * half).store(p)
        for t in range(1, n_tiles):
            slot = t % STAGES
            prev = (t - 1) % STAGES
            mbarrier.wait(ready.index(slot), (t // STAGES) & 1)
            fence_async_shared()  # cp.async (generic proxy) and P's store, before wgmma reads them (async proxy)
            if PINGPONG:  # this warpgroup's MMAs go while the other one runs its softmax
                mbarrier.wait(turn.index(half), t & 1)
            s = warpgroup_mma(q_half, k_ring.index(slot).permute((1, 0)), zeros_s, use_acc=False, is_async=True)
            acc = warpgroup_mma(p_ring.index(2 * half + (t - 1) % 2), v_ring.index(prev), acc, is_async=True)
            if PINGPONG:
                mbarrier.arrive(turn.index(1 - half))
            s = warpgroup_mma_wait(1, deps=(s, ))
            p, alpha, m_i, l_i = _probs(s, m_i, l_i, t, n_sink, n_gathered, sink_end, local_start, row_hi, seg_start,
                                        seg_end, r0, offs_n, row_pos, qk_scale, dtype, BLOCK_N)
            p_ring.index(2 * half + t % 2).store(p)
            acc = warpgroup_mma_wait(0, deps=(acc, ))
            mbarrier.arrive(empty.index(prev))
            acc = acc * gl.convert_layout(alpha, rows_o)[:, None]
        fence_async_shared()
        acc = warpgroup_mma(p_ring.index(2 * half + (n_tiles - 1) % 2), v_ring.index((n_tiles - 1) % STAGES), acc)
        mbarrier.arrive(empty.index((n_tiles - 1) % STAGES))
    else:
        for t in range(n_tiles):
            slot = t % STAGES
            mbarrier.wait(ready.index(slot), (t // STAGES) & 1)
            fence_async_shared()  # cp.async wrote through the generic proxy; wgmma reads through the async one
            if PINGPONG:
                mbarrier.wait(turn.index(half), t & 1)
            s = warpgroup_mma(q_half, k_ring.index(slot).permute((1, 0)), zeros_s, use_acc=False, is_async=True)
            if PINGPONG:
                mbarrier.arrive(turn.index(1 - half))
            s = warpgroup_mma_wait(0, deps=(s, ))
            p, alpha, m_i, l_i = _probs(s, m_i, l_i, t, n_sink, n_gathered, sink_end, local_start, row_hi, seg_start,
                                        seg_end, r0, offs_n, row_pos, qk_scale, dtype, BLOCK_N)
            acc = acc * gl.convert_layout(alpha, rows_o)[:, None]
            acc = warpgroup_mma(gl.convert_layout(p, p_layout), v_ring.index(slot), acc, is_async=True)
            acc = warpgroup_mma_wait(0, deps=(acc, ))
            mbarrier.arrive(empty.index(slot))

    l_safe = gl.where(l_i > 0, l_i, 1.0)
    out = acc / gl.convert_layout(l_safe, rows_o)[:, None]
    m_o = half * HALF_M + gl.arange(0, HALF_M, layout=rows_o)
    offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    o_head = (first_head + m_o // ROWS).to(gl.int64)
    o_row = r0 + m_o % ROWS
    o_ok = (o_row < row_hi) & (head_base + m_o // ROWS < heads_per_plan)
    o_ptrs = Out + b * stride_ob + o_head[:, None] * stride_oh + o_row.to(gl.int64)[:, None] * stride_on
    gl.store(o_ptrs + offs_d[None, :], out.to(dtype), mask=o_ok[:, None])
    if RETURN_LSE:
        lse_head = (first_head + m_in_tile // ROWS).to(gl.int64)
        lse_ok = (row_pos < row_hi) & (head_base + m_in_tile // ROWS < heads_per_plan)
        lse = (m_i + gl.log2(l_i)) * 0.6931471805599453
        gl.store(Lse + (b * num_q_heads + lse_head) * seq_len + row_pos, lse, mask=lse_ok)


@gluon.jit
def _stripe_fwd_ws(
    Q, K, V, Out, Lse, Offsets, Indices,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    seq_len, num_q_heads, plan_heads, heads_per_plan, q_per_kv, head_chunks,
    group_rows, num_groups, tiles_per_group, sink, local, qk_scale,
    HEAD_DIM: gl.constexpr, HEAD_TILE: gl.constexpr, ROWS: gl.constexpr, BLOCK_N: gl.constexpr,
    STAGES: gl.constexpr, PINGPONG: gl.constexpr, OVERLAP: gl.constexpr, PRODUCER_WARPS: gl.constexpr,
    CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr, RETURN_LSE: gl.constexpr,
):
    BLOCK_M: gl.constexpr = HEAD_TILE * ROWS
    dtype: gl.constexpr = Q.dtype.element_ty
    tile = gl.num_programs(1) - 1 - gl.program_id(1)
    group = tile // tiles_per_group
    group_start = group * group_rows
    r0 = group_start + (tile % tiles_per_group) * ROWS
    row_hi = gl.minimum(gl.minimum(group_start + group_rows, seq_len), r0 + ROWS)
    if r0 >= row_hi:
        return
    pid_bh = gl.program_id(0)
    chunk = pid_bh % head_chunks
    hp = (pid_bh // head_chunks) % plan_heads
    b = (pid_bh // head_chunks // plan_heads).to(gl.int64)
    first_head = hp * heads_per_plan + chunk * HEAD_TILE
    head_base = chunk * HEAD_TILE
    kv_head = (first_head // q_per_kv).to(gl.int64)
    k_base = K + b * stride_kb + kv_head * stride_kh
    v_base = V + b * stride_vb + kv_head * stride_vh

    ld_layout: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[2, 16],
                                               warps_per_cta=[gl.num_warps(), 1], order=[1, 0])
    offs_m = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, ld_layout))
    offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, ld_layout))
    q_head = (first_head + offs_m // ROWS).to(gl.int64)
    q_row = r0 + offs_m % ROWS
    q_ok = (q_row < row_hi) & (head_base + offs_m // ROWS < heads_per_plan)
    q_ptrs = Q + b * stride_qb + q_head[:, None] * stride_qh + q_row.to(gl.int64)[:, None] * stride_qn
    q = gl.load(q_ptrs + offs_d[None, :], mask=q_ok[:, None], other=0.0)
    q_smem_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, HEAD_DIM], dtype)
    kv_smem_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], dtype)
    q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], q_smem_layout, value=q)
    k_ring = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], kv_smem_layout)
    v_ring = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], kv_smem_layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    p_smem_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([64, BLOCK_N], dtype)
    p_ring = gl.allocate_shared_memory(dtype, [4 if OVERLAP else 1, 64, BLOCK_N], p_smem_layout)
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=PRODUCER_WARPS * 32)  # one cp.async arrive per producer thread
        mbarrier.init(empty.index(i), count=2)  # one arrive per consumer warpgroup
    mbarrier.init(turn.index(0), count=1)
    mbarrier.init(turn.index(1), count=1)
    if PINGPONG:
        mbarrier.arrive(turn.index(0))  # consumer 0 goes first
    fence_async_shared()
    gl.thread_barrier()

    local_start = gl.maximum(group_start - local, 0)
    sink_end = gl.minimum(sink, local_start)
    segment = (b * plan_heads + hp) * num_groups + group
    seg_start = gl.load(Offsets + segment)
    seg_end = gl.load(Offsets + segment + 1)
    n_sink = gl.cdiv(sink_end, BLOCK_N)
    n_gathered = gl.cdiv(seg_end - seg_start, BLOCK_N).to(gl.int32)
    n_tiles = n_sink + n_gathered + gl.cdiv(row_hi - local_start, BLOCK_N)

    gl.warp_specialize([
        (_consumer, (0, q_smem, k_ring, v_ring, p_ring, ready, empty, turn, Out, Lse, stride_ob, stride_oh, stride_on,
                     b, first_head, head_base, heads_per_plan, num_q_heads, seq_len, r0, row_hi, n_tiles, n_sink,
                     n_gathered, sink_end, local_start, seg_start, seg_end, qk_scale,
                     HEAD_DIM, ROWS, BLOCK_N, STAGES, PINGPONG, OVERLAP, RETURN_LSE)),
        (_consumer, (1, q_smem, k_ring, v_ring, p_ring, ready, empty, turn, Out, Lse, stride_ob, stride_oh, stride_on,
                     b, first_head, head_base, heads_per_plan, num_q_heads, seq_len, r0, row_hi, n_tiles, n_sink,
                     n_gathered, sink_end, local_start, seg_start, seg_end, qk_scale,
                     HEAD_DIM, ROWS, BLOCK_N, STAGES, PINGPONG, OVERLAP, RETURN_LSE)),
        (_producer, (k_ring, v_ring, ready, empty, k_base, v_base, Indices, stride_kn, stride_vn, n_tiles, n_sink,
                     n_gathered, sink_end, local_start, row_hi, seg_start, seg_end, HEAD_DIM, BLOCK_N, STAGES,
                     PRODUCER_WARPS)),
    ], [4, PRODUCER_WARPS], [CONSUMER_REGS, PRODUCER_REGS])


def supported(q: torch.Tensor, block_m: int) -> bool:
    """Whether this kernel runs q (with block_m stacked rows per program) on its device."""
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] == HEAD_DIM
            and block_m == BLOCK_M and torch.cuda.get_device_capability(q.device) == (9, 0))


def launch(q, k, v, out, lse, plan, plan_heads, head_tile, rows, head_chunks, tiles_per_group, scale_log2):
    """Launch on inputs the Triton launcher validated, with its tile shape; fills out (and lse)."""
    batch, num_q, seq_len, _ = q.shape
    grid = (batch * plan_heads * head_chunks, plan.num_groups * tiles_per_group)
    _stripe_fwd_ws[grid](
        q, k, v, out, out if lse is None else lse, plan.offsets, plan.indices,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        seq_len, num_q, plan_heads, num_q // plan_heads, num_q // k.shape[1], head_chunks,
        plan.group_rows, plan.num_groups, tiles_per_group, plan.sink, plan.local, scale_log2,
        HEAD_DIM=HEAD_DIM, HEAD_TILE=head_tile, ROWS=rows, BLOCK_N=BLOCK_N, STAGES=STAGES, PINGPONG=PINGPONG,
        OVERLAP=OVERLAP, PRODUCER_WARPS=PRODUCER_WARPS, CONSUMER_REGS=CONSUMER_REGS, PRODUCER_REGS=PRODUCER_REGS,
        RETURN_LSE=lse is not None, num_warps=4,
    )
