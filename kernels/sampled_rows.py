"""Exact causal attention of a few query rows in Triton, split over the keys: what the error guard checks against.

The guard (:mod:`sparse_prefill.guard`) needs exact attention for ~64 query rows spread over the prompt.
SDPA with those rows' causal mask gives it, but runs each head's 64 rows as one program walking every key:
14-32 programs on a GPU with 132 SMs, 0.5-0.9 ms per layer at 32k (H200, benchmarks/guard_cost.py), as long
as anchor's whole identification. Here the keys are cut in chunks, one program per (chunk, query head, row
tile) folds its chunk into a partial online softmax (the stripe kernel's ``contiguous_window``), and the
partials are merged by their row maxima in PyTorch: the flash-decoding split, for sampled rows.

With a plan's key mask of those rows (``keep``), the same pass also folds the kept keys into a second state:
the plan's output on the rows, for the guard to judge a plan before it runs (no work spent on a plan it
rejects). Each K/V tile is loaded once for both.

Equivalent PyTorch code: :func:`sparse_prefill.kernels.reference.sampled_rows_reference` (with ``keep``: the
same with the causal mask and'ed with ``keep``).
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
    load_rows,
    softmax_update,
    validate_kernel_inputs,
)

__all__ = ["sampled_rows_attention", "exact_and_kept_rows", "chunk_keys"]

_BLOCK_N = 64  # keys per tile
_MAX_CHUNKS = 128  # per head: bounds the partials' memory at B * Hq * 128 * rows * D floats


def chunk_keys(seq_len: int) -> int:
    """Keys per program: 1024 (a few hundred programs at 32k), more past 128k so the chunks stay <= 128."""
    return max(1024, triton.cdiv(triton.cdiv(seq_len, _MAX_CHUNKS), _BLOCK_N) * _BLOCK_N)


@triton.jit
def _partial_kernel(
    Q, K, V, Rows, M, L, Acc, Keep, KeptM, KeptL, KeptAcc,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    seq_len, num_rows, num_q_heads, q_per_kv, q_per_keep, num_chunks, chunk_len, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_KEEP: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """Partial (row max, row sum, unnormalised output) of one chunk of keys for one row tile of one head; with
    HAS_KEEP the same over the keys ``Keep`` [B * keep heads, rows, seq_len] marks, in KeptM / KeptL / KeptAcc."""
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
    k_base, v_base = K + b * stride_kb + kv * stride_kh, V + b * stride_vb + kv * stride_vh
    at = (bh * num_chunks + chunk) * num_rows + offs_r  # [B * Hq, chunks, rows] partials
    if HAS_KEEP:
        kept_acc, kept_m, kept_l = initial_state(BLOCK_R, BLOCK_D)
        keep_base = Keep + ((b * (num_q_heads // q_per_keep) + h // q_per_keep) * num_rows) * seq_len
        for n0 in range(start, end, BLOCK_N):
            keys = n0 + tl.arange(0, BLOCK_N)
            key_ok = keys < end
            causal = (keys[None, :] <= rows[:, None]) & key_ok[None, :]
            kept = tl.load(keep_base + offs_r[:, None].to(tl.int64) * seq_len + keys[None, :],
                           mask=r_ok[:, None] & key_ok[None, :], other=0) != 0
            k_tile = load_rows(k_base, keys.to(tl.int64), key_ok, stride_kn, offs_d, d_ok)
            v_tile = load_rows(v_base, keys.to(tl.int64), key_ok, stride_vn, offs_d, d_ok)
            acc, m_i, l_i = softmax_update(acc, m_i, l_i, q, k_tile, v_tile, causal, qk_scale, True,
                                           DOT_PRECISION, UPCAST)
            kept_acc, kept_m, kept_l = softmax_update(kept_acc, kept_m, kept_l, q, k_tile, v_tile, causal & kept,
                                                      qk_scale, True, DOT_PRECISION, UPCAST)
        tl.store(KeptM + at, tl.where(inside, kept_m, float("nan")), mask=r_ok)
        tl.store(KeptL + at, kept_l, mask=r_ok)
        tl.store(KeptAcc + at[:, None] * HEAD_DIM + offs_d[None, :], kept_acc, mask=r_ok[:, None] & d_ok[None, :])
    else:
        acc, m_i, l_i = contiguous_window(
            acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, start, end, rows, tl.arange(0, BLOCK_N), offs_d,
            d_ok, qk_scale, BLOCK_N, True, False, DOT_PRECISION, UPCAST,
        )
    tl.store(M + at, tl.where(inside, m_i, float("nan")), mask=r_ok)
    tl.store(L + at, l_i, mask=r_ok)
    tl.store(Acc + at[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=r_ok[:, None] & d_ok[None, :])


def sampled_rows_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor,
                           scale: float, chunk_len: int | None = None) -> torch.Tensor:
    """float32 [B, Hq, R, D]: exact causal attention of query rows ``rows`` (int64, each in [0, N); checking would
    cost a host sync, so a row outside gets NaN, never a read outside q) of q [B, Hq, N, D] over k, v
    [B, Hkv, N, D] (GQA read in place). ``chunk_len``: keys per program, a multiple of 64 (default
    :func:`chunk_keys`). Memory: the partials, B * Hq * R * D floats per chunk."""
    return _run(q, k, v, rows, None, scale, chunk_len)[0]


def exact_and_kept_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor, keep: torch.Tensor,
                        scale: float, chunk_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(exact, kept), each float32 [B, Hq, R, D]: :func:`sampled_rows_attention` of ``rows``, and attention of the
    same rows over only the keys ``keep`` marks (bool [B, Hp, R, N], Hp dividing Hq: a plan's ``rows_mask``, one
    per KV group or per query head), causal. A row with no kept key gets 0 (a plan that drops every key of a row
    has lost all of it)."""
    batch, num_q, seq_len = q.shape[:3]
    if (keep.dtype != torch.bool or keep.dim() != 4 or keep.device != q.device
            or keep.shape[0] != batch or keep.shape[1] == 0 or num_q % keep.shape[1]
            or tuple(keep.shape[2:]) != (rows.numel(), seq_len)):
        raise ValueError(f"keep must be a bool [B={batch}, Hp, R={rows.numel()}, N={seq_len}] tensor on {q.device} "
                         f"with Hp dividing {num_q}, got {keep.dtype} {tuple(keep.shape)} on {keep.device}")
    exact, kept = _run(q, k, v, rows, keep, scale, chunk_len)
    assert kept is not None
    return exact, kept


def _run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor, keep: torch.Tensor | None,
         scale: float, chunk_len: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Checks, launches the chunks' partials and merges them: (exact, kept or None)."""
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
    exact = _partials(batch * num_q, chunks, num_rows, head_dim, q.device)
    kept = None if keep is None else _partials(batch * num_q, chunks, num_rows, head_dim, q.device)
    keep_flat = exact[0] if keep is None else keep.contiguous().view(torch.uint8)  # Keep is unread without a mask
    dot_precision, upcast = dot_settings(q.dtype)
    _partial_kernel[(chunks, batch * num_q, triton.cdiv(num_rows, block_r))](
        q, k, v, rows.contiguous(), *exact, keep_flat, *(exact if kept is None else kept),
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        seq_len, num_rows, num_q, num_q // k.shape[1], num_q // (1 if keep is None else keep.shape[1]), chunks,
        chunk_len, scale * LOG2E,
        HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_R=block_r, BLOCK_N=_BLOCK_N,
        HAS_KEEP=keep is not None, DOT_PRECISION=dot_precision, UPCAST=upcast, num_warps=4, num_stages=2,
    )
    shape = (batch, num_q, num_rows, head_dim)
    return _merge(*exact).view(shape), None if kept is None else _merge(*kept).view(shape)


def _partials(programs: int, chunks: int, num_rows: int, head_dim: int,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Uninitialised (row max, row sum [programs, chunks, rows], output [.., D]) float32, one entry per chunk."""
    m = torch.empty(programs, chunks, num_rows, dtype=torch.float32, device=device)
    return m, torch.empty_like(m), torch.empty(programs, chunks, num_rows, head_dim, dtype=torch.float32, device=device)


def _merge(m: torch.Tensor, l: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:  # noqa: E741
    """The chunks' partials merged with weights 2^(m - max m); a row whose sum is 0 (no key) gives 0."""
    weight = torch.exp2(m - m.amax(dim=1, keepdim=True))
    total = (l * weight).sum(dim=1).unsqueeze(-1)
    return (acc * weight.unsqueeze(-1)).sum(dim=1) / torch.where(total > 0, total, 1.0)
