"""EXPERIMENT, not wired in: stripe attention for Hopper (sm_90) in Gluon.

Same contract and program layout as :mod:`sparse_prefill.kernels.stripe_attention` (one program:
``ROWS`` rows of ``HEAD_TILE`` query heads stacked to 128 MMA rows; the initial window, the
group's selected keys and the local window), written to get what Triton's compiler cannot give
on Hopper:

* The program's key tiles form one sequence, so one loop runs them all with a hand-written schedule.
* S(j) = q.k^T and PV(j-1) are issued together and only S(j) is waited for, so that tile j's
  softmax runs while PV(j-1) does (FlashAttention-3's intra-warpgroup overlap). Triton 3.6 waits
  for every wgmma right after issuing it unless it accumulates into itself.
* K/V rows are gathered by ``cp.async`` into a ring of ``STAGES`` shared-memory slots.

Measured on the H200 (docs/benchmarks/speed.md, "What holds the executor at ~72%"): the output
matches the Triton kernel on every plan, but ptxas hoists the wait for PV(j-1) above the softmax,
so the tile runs serially again and the kernel is 5-12% slower. Kept in the history for the next
attempt (make ptxas keep the overlap, or warp-specialise); removed from the tree in the next commit.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    async_copy,
    fence_async_shared,
    warpgroup_mma,
    warpgroup_mma_init,
    warpgroup_mma_wait,
)

__all__ = ["launch_sm90", "sm90_supported"]

SM90_HEAD_DIM = 128
SM90_BLOCK_M = 128  # stacked query rows per program: two warpgroups of 64
SM90_BLOCK_N = 64  # keys per tile
SM90_STAGES = 4  # K/V ring depth: tile j+2 is loading while tile j is multiplied
SM90_WARPS = 8


@gluon.jit
def _tile_span(t, n_sink, n_gathered, sink_end, local_start, row_hi, seg_start, seg_end, BLOCK_N: gl.constexpr):
    """Where tile t's keys come from: (gathered?, first, end) with first/end slots of the CSR
    segment for a gathered tile, keys of the initial or local window otherwise."""
    gathered = (t >= n_sink) & (t < n_sink + n_gathered)
    is_sink = t < n_sink
    window_first = gl.where(is_sink, t * BLOCK_N, local_start + (t - n_sink - n_gathered) * BLOCK_N)
    window_end = gl.where(is_sink, sink_end, row_hi)
    first = gl.where(gathered, seg_start + (t - n_sink).to(gl.int64) * BLOCK_N, window_first.to(gl.int64))
    end = gl.where(gathered, seg_end, window_end.to(gl.int64))
    return gathered, first, end


@gluon.jit
def _tile_load_keys(t, n_tiles, n_sink, n_gathered, sink_end, local_start, row_hi, Indices, seg_start, seg_end, offs,
                    BLOCK_N: gl.constexpr):
    """K/V row numbers of tile t (int64) and which slots hold a key; all empty past the last tile."""
    gathered, first, end = _tile_span(t, n_sink, n_gathered, sink_end, local_start, row_hi, seg_start, seg_end,
                                      BLOCK_N)
    span = first + offs
    key_ok = (span < end) & (t < n_tiles)
    picked = gl.load(Indices + span, mask=key_ok & gathered, other=0)
    return gl.where(gathered, picked.to(gl.int64), span), key_ok


@gluon.jit
def _step_mask(t, n_sink, n_gathered, sink_end, local_start, row_hi, r0, seg_start, seg_end, BLOCK_N: gl.constexpr):
    """Whether tile t needs masking (a partial tile, or local keys at or past the first row), with
    its span: (needs_mask, gathered, first, end)."""
    gathered, first, end = _tile_span(t, n_sink, n_gathered, sink_end, local_start, row_hi, seg_start, seg_end,
                                      BLOCK_N)
    causal = (t >= n_sink + n_gathered) & (first + BLOCK_N > r0)
    return (first + BLOCK_N > end) | causal, gathered, first, end


@gluon.jit
def _softmax_probs(s, m_i, l_i, needs_mask, gathered, first, end, offs_n, row_pos, qk_scale, dtype: gl.constexpr,
                   p_layout: gl.constexpr):
    """Fold one tile's raw scores into the running max and sum: (P in 16 bits as the PV wgmma's
    register operand, alpha = the accumulator's rescale, new max, new sum). Only masked tiles
    build the mask."""
    s = s * qk_scale
    if needs_mask:
        filled = (end - first).to(gl.int32)  # slots of the tile that hold a key
        # Gathered keys precede the local window, hence every row: only empty slots are masked.
        key = gl.where(gathered, 0, first.to(gl.int32) + offs_n)
        visible = (key[None, :] <= row_pos[:, None]) & (offs_n < filled)[None, :]
        s = gl.where(visible, s, float("-inf"))
    # m_i starts finite, so a fully masked row gives p = 0 and alpha = 1, never NaN.
    m_new = gl.maximum(m_i, gl.max(s, axis=1))
    alpha = gl.exp2(m_i - m_new)
    p = gl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + gl.sum(p, axis=1)
    return gl.convert_layout(p.to(dtype), p_layout), alpha, m_new, l_i


@gluon.jit
def _softmax_step(s, acc, m_i, l_i, needs_mask, gathered, first, end, offs_n, row_pos, qk_scale,
                  dtype: gl.constexpr, p_layout: gl.constexpr, acc_layout: gl.constexpr):
    """_softmax_probs with the accumulator rescaled at once (nothing is in flight)."""
    p, alpha, m_i, l_i = _softmax_probs(s, m_i, l_i, needs_mask, gathered, first, end, offs_n, row_pos, qk_scale,
                                        dtype, p_layout)
    return p, acc * gl.convert_layout(alpha, gl.SliceLayout(1, acc_layout))[:, None], m_i, l_i


@gluon.jit
def _issue_tile_loads(k_buf, v_buf, k_base, v_base, stride_kn, stride_vn, keys, key_ok, offs_d):
    """cp.async K and V rows ``keys`` into one ring slot (empty slots read zeros), as one group."""
    rows = keys[:, None]
    async_copy.async_copy_global_to_shared(k_buf, k_base + rows * stride_kn + offs_d[None, :], mask=key_ok[:, None])
    async_copy.async_copy_global_to_shared(v_buf, v_base + rows * stride_vn + offs_d[None, :], mask=key_ok[:, None])
    async_copy.commit_group()


@gluon.jit
def _stripe_fwd_sm90(
    Q, K, V, Out, Lse, Offsets, Indices,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    seq_len, num_q_heads, plan_heads, heads_per_plan, q_per_kv, head_chunks,
    group_rows, num_groups, tiles_per_group, sink, local, qk_scale,
    HEAD_DIM: gl.constexpr, HEAD_TILE: gl.constexpr, ROWS: gl.constexpr, BLOCK_N: gl.constexpr,
    STAGES: gl.constexpr, RETURN_LSE: gl.constexpr,
):
    BLOCK_M: gl.constexpr = HEAD_TILE * ROWS
    NUM_WARPS: gl.constexpr = gl.num_warps()
    dtype: gl.constexpr = Q.dtype.element_ty
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    # 16-byte vectors along the head dim for every global load and cp.async.
    ld_layout: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[2, 16],
                                               warps_per_cta=[NUM_WARPS, 1], order=[1, 0])
    q_smem_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, HEAD_DIM], dtype)
    kv_smem_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], dtype)
    rows_ld: gl.constexpr = gl.SliceLayout(1, ld_layout)
    cols_ld: gl.constexpr = gl.SliceLayout(0, ld_layout)
    rows_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    cols_s: gl.constexpr = gl.SliceLayout(0, s_layout)

    # Which rows and heads: as the Triton kernel (last groups first, every head of one before the next).
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
    kv_head = (first_head // q_per_kv).to(gl.int64)
    k_base = K + b * stride_kb + kv_head * stride_kh
    v_base = V + b * stride_vb + kv_head * stride_vh

    # q tile -> shared memory (the A operand of every q.k^T wgmma).
    offs_m = gl.arange(0, BLOCK_M, layout=rows_ld)
    offs_d = gl.arange(0, HEAD_DIM, layout=cols_ld)
    q_head = (first_head + offs_m // ROWS).to(gl.int64)
    q_row = r0 + offs_m % ROWS
    q_ok = (q_row < row_hi) & (chunk * HEAD_TILE + offs_m // ROWS < heads_per_plan)
    q_ptrs = Q + b * stride_qb + q_head[:, None] * stride_qh + q_row.to(gl.int64)[:, None] * stride_qn
    q = gl.load(q_ptrs + offs_d[None, :], mask=q_ok[:, None], other=0.0)
    q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], q_smem_layout, value=q)
    k_ring = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], kv_smem_layout)
    v_ring = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], kv_smem_layout)

    # The program's tiles: initial window, selected keys (CSR segment), local window up to row_hi.
    local_start = gl.maximum(group_start - local, 0)
    sink_end = gl.minimum(sink, local_start)
    segment = (b * plan_heads + hp) * num_groups + group
    seg_start = gl.load(Offsets + segment)
    seg_end = gl.load(Offsets + segment + 1)
    n_sink = gl.cdiv(sink_end, BLOCK_N)
    n_gathered = gl.cdiv(seg_end - seg_start, BLOCK_N).to(gl.int32)
    n_tiles = n_sink + n_gathered + gl.cdiv(row_hi - local_start, BLOCK_N)  # >= 1: a row sees itself
    offs_n_ld = gl.arange(0, BLOCK_N, layout=rows_ld)
    offs_n_s = gl.arange(0, BLOCK_N, layout=cols_s)
    row_pos = r0 + gl.arange(0, BLOCK_M, layout=rows_s) % ROWS

    # Tile j: S(j) = q.k^T and PV(j-1) go to the tensor cores together; the softmax of S(j) runs
    # while PV(j-1) does (FlashAttention-3's intra-warpgroup overlap), then the accumulator is
    # rescaled with nothing in flight. K/V of tile j + STAGES - 2 load meanwhile, into the ring
    # slot of tile j - 2, whose PV every warp waited for before this iteration's barrier.
    for t in gl.static_range(STAGES - 2):  # tiles 0 .. STAGES-3 start loading
        keys, key_ok = _tile_load_keys(t, n_tiles, n_sink, n_gathered, sink_end, local_start, row_hi, Indices,
                                       seg_start, seg_end, offs_n_ld, BLOCK_N)
        _issue_tile_loads(k_ring.index(t), v_ring.index(t), k_base, v_base, stride_kn, stride_vn, keys, key_ok,
                          offs_d)
    zeros_s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    m_i = gl.full([BLOCK_M], -1.0e30, gl.float32, rows_s)
    l_i = gl.zeros([BLOCK_M], gl.float32, rows_s)

    # Tile 0 alone: no PV before it.
    keys, key_ok = _tile_load_keys(STAGES - 2, n_tiles, n_sink, n_gathered, sink_end, local_start, row_hi, Indices,
                                   seg_start, seg_end, offs_n_ld, BLOCK_N)
    needs_mask, gathered, first, end = _step_mask(0, n_sink, n_gathered, sink_end, local_start, row_hi, r0, seg_start,
                                                  seg_end, BLOCK_N)
    async_copy.wait_group(STAGES - 3)
    gl.thread_barrier()
    fence_async_shared()
    s = warpgroup_mma(q_smem, k_ring.index(0).permute((1, 0)), zeros_s, use_acc=False)
    p, acc, m_i, l_i = _softmax_step(s, gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout), m_i, l_i, needs_mask,
                                     gathered, first, end, offs_n_s, row_pos, qk_scale, dtype, p_layout, o_layout)
    _issue_tile_loads(k_ring.index(STAGES - 2), v_ring.index(STAGES - 2), k_base, v_base, stride_kn, stride_vn, keys,
                      key_ok, offs_d)

    for j in range(1, n_tiles):
        ahead = j + STAGES - 2
        # Row numbers to prefetch, loaded now so the index load's latency passes during the softmax.
        keys, key_ok = _tile_load_keys(ahead, n_tiles, n_sink, n_gathered, sink_end, local_start, row_hi, Indices,
                                       seg_start, seg_end, offs_n_ld, BLOCK_N)
        needs_mask, gathered, first, end = _step_mask(j, n_sink, n_gathered, sink_end, local_start, row_hi, r0,
                                                      seg_start, seg_end, BLOCK_N)
        async_copy.wait_group(STAGES - 3)  # this thread's copies of tile j have landed ...
        gl.thread_barrier()  # ... and every thread's
        fence_async_shared()  # cp.async wrote through the generic proxy; wgmma reads through the async one
        s = warpgroup_mma(q_smem, k_ring.index(j % STAGES).permute((1, 0)), zeros_s, use_acc=False, is_async=True)
        acc = warpgroup_mma(p, v_ring.index((j - 1) % STAGES), acc, is_async=True)
        s = warpgroup_mma_wait(1, deps=(s, ))  # S(j) done; PV(j-1) still running
        p_next, alpha, m_i, l_i = _softmax_probs(s, m_i, l_i, needs_mask, gathered, first, end, offs_n_s, row_pos,
                                                 qk_scale, dtype, p_layout)
        # PV(j-1) done: P(j-1) and acc are free. P(j) and alpha pass through the wait so that the
        # compiler keeps the softmax before it, overlapping PV(j-1), instead of sinking it after.
        acc, p, p_next, alpha = warpgroup_mma_wait(0, deps=(acc, p, p_next, alpha))
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
        p = p_next
        _issue_tile_loads(k_ring.index(ahead % STAGES), v_ring.index(ahead % STAGES), k_base, v_base, stride_kn,
                          stride_vn, keys, key_ok, offs_d)
    acc = warpgroup_mma(p, v_ring.index((n_tiles - 1) % STAGES), acc)
    async_copy.wait_group(0)  # copies issued for tiles past the last one (all masked off)

    rows_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    l_safe = gl.where(l_i > 0, l_i, 1.0)
    out = acc / gl.convert_layout(l_safe, rows_o)[:, None]
    offs_mo = gl.arange(0, BLOCK_M, layout=rows_o)
    offs_do = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    o_head = (first_head + offs_mo // ROWS).to(gl.int64)
    o_row = r0 + offs_mo % ROWS
    o_ok = (o_row < row_hi) & (chunk * HEAD_TILE + offs_mo // ROWS < heads_per_plan)
    o_ptrs = Out + b * stride_ob + o_head[:, None] * stride_oh + o_row.to(gl.int64)[:, None] * stride_on
    gl.store(o_ptrs + offs_do[None, :], out.to(dtype), mask=o_ok[:, None])
    if RETURN_LSE:
        offs_ms = gl.arange(0, BLOCK_M, layout=rows_s)
        lse_head = (first_head + offs_ms // ROWS).to(gl.int64)
        lse_ok = (row_pos < row_hi) & (chunk * HEAD_TILE + offs_ms // ROWS < heads_per_plan)
        lse = (m_i + gl.log2(l_i)) * 0.6931471805599453
        gl.store(Lse + (b * num_q_heads + lse_head) * seq_len + row_pos, lse, mask=lse_ok)


def sm90_supported(q: torch.Tensor, block_m: int) -> bool:
    """Whether this kernel runs q (with block_m stacked rows per program) on its device."""
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] == SM90_HEAD_DIM
            and block_m == SM90_BLOCK_M and torch.cuda.get_device_capability(q.device) == (9, 0))


def launch_sm90(q, k, v, out, lse, plan, plan_heads, head_tile, rows, head_chunks, tiles_per_group, scale_log2):
    """Launch on validated inputs (the Triton launcher's checks and tile shape); fills out (and lse)."""
    batch, num_q, seq_len, _ = q.shape
    grid = (batch * plan_heads * head_chunks, plan.num_groups * tiles_per_group)
    _stripe_fwd_sm90[grid](
        q, k, v, out, out if lse is None else lse, plan.offsets, plan.indices,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        seq_len, num_q, plan_heads, num_q // plan_heads, num_q // k.shape[1], head_chunks,
        plan.group_rows, plan.num_groups, tiles_per_group, plan.sink, plan.local, scale_log2,
        HEAD_DIM=SM90_HEAD_DIM, HEAD_TILE=head_tile, ROWS=rows, BLOCK_N=SM90_BLOCK_N, STAGES=SM90_STAGES,
        RETURN_LSE=lse is not None, num_warps=SM90_WARPS,
    )
