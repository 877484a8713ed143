"""Exact causal attention of a few query rows in Triton, split over the keys: what the error guard checks against.

The guard (:mod:`sparse_prefill.guard`) needs exact attention for ~64 query rows spread over the prompt.
SDPA with those rows' causal mask gives it, but runs each head's 64 rows as one program walking every key:
14-32 programs on a GPU with 132 SMs, 0.5-0.9 ms per layer at 32k (H200, benchmarks/guard_cost.py), as long
as anchor's whole identification. Here the keys are cut in chunks, one program per (chunk, query head, row
tile) folds its chunk into a partial online softmax (the stripe kernel's ``contiguous_window``), and the
partials are merged by their row maxima in PyTorch: the flash-decoding split, for sampled rows.

Equivalent PyTorch code: :func:`sparse_prefill.kernels.reference.sampled_rows_reference`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparse_prefill.kernels.attention_tiles import (
    LOG2E,
    contiguous_window,
    dot_settings,
    initial_state,
    last_dim_contiguous,
    validate_kernel_inputs,
)
from sparse_prefill.kernels.runtime import FP_FUSION

__all__ = ["sampled_rows_attention", "chunk_keys"]

_BLOCK_N = 64  # keys per tile
_MAX_CHUNKS = 128  # per head: bounds the partials' memory at B * Hq * 128 * rows * D floats


def chunk_keys(seq_len: int) -> int:
    """Keys per program: 1024 (a few hundred programs at 32k), more past 128k so the chunks stay <= 128."""
    return max(1024, triton.cdiv(triton.cdiv(seq_len, _MAX_CHUNKS), _BLOCK_N) * _BLOCK_N)


@triton.jit
def _partial_kernel(
    Q, K, V, Rows, M, L, Acc,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    seq_len, num_rows, num_q_heads, q_per_kv, num_chunks, chunk_len, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """Partial (row max, row sum, unnormalised output) of one chunk of keys for one row tile of one head."""
    chunk = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // num_q_heads, bh % num_q_heads
    kv = h // q_per_kv
    offs_r = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = offs_r < num_rows
    rows = tl.load(Rows + offs_r, mask=r_ok, other=0)
    inside = (rows >= 0) & (rows < seq_len)  # a row outside the sequence reads nothing (its output is NaN)
    rows = tl.where(inside, rows, 0)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qn + offs_d[None, :],
                mask=r_ok[:, None] & d_ok[None, :], other=0.0)
    acc, m_i, l_i = initial_state(BLOCK_R, BLOCK_D)
    start = chunk * chunk_len
    # Keys past the tile's last row are masked for every row: stop there (a chunk past it does no work).
    end = tl.minimum(start + chunk_len, tl.max(tl.where(r_ok, rows, 0)) + 1)
    acc, m_i, l_i = contiguous_window(
        acc, m_i, l_i, q, K + b * stride_kb + kv * stride_kh, V + b * stride_vb + kv * stride_vh, stride_kn,
        stride_vn, start, end, rows, tl.arange(0, BLOCK_N), offs_d, d_ok, qk_scale, BLOCK_N, True, False,
        DOT_PRECISION, UPCAST,
    )
    at = (bh * num_chunks + chunk) * num_rows + offs_r  # [B * Hq, chunks, rows] partials
    tl.store(M + at, tl.where(inside, m_i, float("nan")), mask=r_ok)
    tl.store(L + at, l_i, mask=r_ok)
    tl.store(Acc + at[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=r_ok[:, None] & d_ok[None, :])


def sampled_rows_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor,
                           scale: float, chunk_len: int | None = None) -> torch.Tensor:
    """float32 [B, Hq, R, D]: exact causal attention of query rows ``rows`` (int64, each in [0, N); checking would
    cost a host sync, so a row outside gets NaN, never a read outside q) of q [B, Hq, N, D] over k, v
    [B, Hkv, N, D] (GQA read in place). ``chunk_len``: keys per program, a multiple of 64 (default
    :func:`chunk_keys`). Memory: the partials, B * Hq * R * D floats per chunk."""
    validate_kernel_inputs("sampled_rows_attention", q, k, v, scale)
    chunk_len = chunk_keys(q.shape[2]) if chunk_len is None else chunk_len
    if isinstance(chunk_len, bool) or not isinstance(chunk_len, int) or chunk_len <= 0 or chunk_len % _BLOCK_N:
        raise ValueError(f"chunk_len must be a positive multiple of {_BLOCK_N}, got {chunk_len!r}")
    if rows.dtype != torch.int64 or rows.dim() != 1 or rows.device != q.device or rows.numel() == 0:
        raise ValueError(f"rows must be a non-empty 1-D int64 tensor on {q.device}, got {rows.dtype} "
                         f"{tuple(rows.shape)} on {rows.device}")
    q, k, v = (last_dim_contiguous(x) for x in (q, k, v))
    batch, num_q, seq_len, head_dim = q.shape
    num_rows = rows.numel()
    chunks = triton.cdiv(seq_len, chunk_len)
    block_r = min(64, max(16, triton.next_power_of_2(num_rows)))
    m = torch.empty(batch * num_q, chunks, num_rows, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)  # noqa: E741
    acc = torch.empty(batch * num_q, chunks, num_rows, head_dim, dtype=torch.float32, device=q.device)
    dot_precision, upcast = dot_settings(q.dtype)
    _partial_kernel[(chunks, batch * num_q, triton.cdiv(num_rows, block_r))](
        q, k, v, rows.contiguous(), m, l, acc,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        seq_len, num_rows, num_q, num_q // k.shape[1], chunks, chunk_len, scale * LOG2E,
        HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_R=block_r, BLOCK_N=_BLOCK_N,
        DOT_PRECISION=dot_precision, UPCAST=upcast, num_warps=4, num_stages=2, **FP_FUSION,
    )
    # Merge the chunks: weights 2^(m - max m); every row sees key 0, so its merged sum is > 0.
    weight = torch.exp2(m - m.amax(dim=1, keepdim=True))
    out = (acc * weight.unsqueeze(-1)).sum(dim=1) / (l * weight).sum(dim=1).unsqueeze(-1)
    return out.view(batch, num_q, num_rows, head_dim)
