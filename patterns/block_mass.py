"""The block scores of `xattention` and `flashprefill` in one Triton kernel: scored, softmaxed and summed per
(query block, key block) without materialising a score matrix.

Both patterns score a query block against key blocks through a matrix of logits, softmax it, and sum the
probabilities per key block. In PyTorch that matrix is built in chunks and passed over six or seven times
(mask, finiteness, softmax, padding, sums), in float32: on an H200 at 128k the identification took 4.1x
(xattention, 1.03 s) and 2.4x (flashprefill, 130 ms) the time of executing its own plan; this kernel took them
to 79 ms and 8.4 ms, and its one pass for flashprefill to 5.4 ms on an H100 (docs/benchmarks/patterns.md).
Here one program holds a tile of rows. Antidiagonal: one pass over the key columns keeps each row's running
maximum and sum (the online softmax) and stores, per row and key block, the log2 of the block's sum of exp2
against the running maximum plus that maximum (float32 scratch, one number per row and key block: 1/16 of the
logits at stride 8 and block 128); a second loop reads those back against the row's final maximum and sum and adds
the rows of each query block (it recomputed the logits before, a second pass as costly as the first: 67-72 ms
-> 38-40 ms at 128k, 32 heads, on an H100, docs/benchmarks/xattention_one_pass_h100.json). The first pass is one
loop over (column tile, stride slice) pairs, the softmax step under an ``if`` at each tile's last slice: the
software pipeliner then keeps loads in flight across tiles instead of refilling an inner loop of ``stride`` steps
at every tile (38 -> 30 ms, docs/benchmarks/xattention_flat_loop_h100.json). With ``float8`` the products are taken
from q and k rounded to float8 e4m3 (a power-of-two scale per head, :mod:`~sparse_prefill.kernels.float8`), on
float8 tensor cores where the GPU has them: twice the multiply rate and half the bytes (30 -> 17 ms at 128k on an
H100; with the rounding, a byte per element of q and k beside them, xattention identifies in 20 ms instead of 33:
docs/benchmarks/xattention_float8_h100.json), a slightly different estimate.
Pooled: the rows of a program share one softmax, so one pass suffices: each column tile's masses are summed
against the running maximum of the tiles so far and stored with it, and the launcher rescales the tiles to the
final maximum and sum (the second pass's recomputed logits were about half the kernel's work).
Products are taken in the inputs' dtype and accumulated in float32, as attention kernels do (float8's, when asked,
in the tensor cores' narrower accumulator within one dot on sm_90, unless ``_FLOAT8_PROMOTE`` says otherwise).

* **Antidiagonal** (xattention): row = a ``stride``-row query tile, column = a ``stride``-row key tile, logit
  = the tile's antidiagonal ``sum_i q[r*stride + stride-1-i] . k[c*stride + i]`` times ``scale / stride``;
  causal tile by tile, one softmax per row. Several query blocks share a program (at least 64 rows).
* **Pooled** (flashprefill): row = a query row, column = a key block's mean key, scored once the block's last
  key is at or before the row; one softmax over the whole query block.

Non-finite logits count as no mass (a row without a finite one adds nothing), as in the PyTorch versions.
The PyTorch functions they are tested against: :func:`~sparse_prefill.patterns.xattention.xattention_block_mass`
and :func:`~sparse_prefill.patterns.flashprefill.flashprefill_block_scores`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparse_prefill.kernels.attention_tiles import DTYPES, LOG2E, dot_settings, last_dim_contiguous, mma
from sparse_prefill.kernels.float8 import float8_dot_supported, float8_rounded, float8_values
from sparse_prefill.kernels.runtime import FP_FUSION

__all__ = ["antidiagonal_block_mass", "pooled_block_scores", "block_mass_problems"]

# Rows per program: enough for the tensor cores, several xattention query blocks (H200, 128k: 77 ms; 32 rows 110 ms).
_MIN_ROWS = 64
# Key columns per step, measured on an H100 at 128k (bf16, 32 heads): pooled 64 (4.0 ms; 128: 5.7, 32: 5.2),
# antidiagonal 128 (69 ms; 64: 93, 32: 207).
_POOLED_COLS = 64
_ANTIDIAGONAL_COLS = 128
# Antidiagonal: key blocks per step of the second loop (over the scratch), and the most scratch one launch uses.
_LSE_COLS = 64
_SCRATCH_BYTES = 512 << 20
_MAX_HEAD_DIM = 256
# Antidiagonal: loads in flight across the (column tile, slice) loop; H100, 128k, bf16, 32 heads: 3 stages 30 ms,
# 2 stages 35 ms (the loop nested per tile, 2 stages: 38 ms).
_STAGES = 3
# float8 products summed in float32 every this many terms of the head dimension (at most its padded size); None:
# the tensor cores' own accumulator for the whole dot (sm_90's default, fewer bits than float32).
_FLOAT8_PROMOTE = None


def block_mass_problems(q: torch.Tensor, block: int, stride: int = 1, pooled: bool = False) -> list[str]:
    """Why the kernel cannot score these inputs (empty: it can); the callers then score in PyTorch."""
    device = [] if q.device.type == "cuda" else [f"device {q.device.type} (the kernel runs on CUDA)"]
    return device + _input_problems(q, block, stride, pooled)


def _input_problems(q: torch.Tensor, block: int, stride: int, pooled: bool) -> list[str]:
    """Dtype, head dim and tile shapes the kernel takes on any device (the CPU tests run the interpreter). The
    tiles allowed are those measured on an H200 (a taller one may pass the shared memory)."""
    problems = []
    if q.dtype not in DTYPES:
        problems.append(f"dtype {q.dtype}")
    if q.shape[-1] > _MAX_HEAD_DIM:
        problems.append(f"head dim {q.shape[-1]} > {_MAX_HEAD_DIM}")
    per_block = block // stride
    if per_block & (per_block - 1):
        problems.append(f"block // stride = {per_block} is not a power of two")
    elif per_block > (128 if pooled else 64):
        problems.append(f"block // stride = {per_block} > {128 if pooled else 64}")
    return problems


@triton.jit
def _slice_product(q_base, k_base, stride_qn, stride_kn, row, cols, i, seq_len, key_rows, offs_d, d_ok,
                   STRIDE: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                   FP8: tl.constexpr = False, FP8_PROMOTE: tl.constexpr = None):
    """[rows, cols] products of stride slice ``i``: query rows ``row * STRIDE + STRIDE-1-i`` against key rows
    ``cols * STRIDE + i`` (the antidiagonals' i-th terms; with STRIDE 1, plain q . k)."""
    q_rows = row * STRIDE + (STRIDE - 1 - i)
    k_rows = cols * STRIDE + i
    q = tl.load(q_base + q_rows.to(tl.int64)[:, None] * stride_qn + offs_d[None, :],
                mask=(q_rows < seq_len)[:, None] & d_ok[None, :], other=0.0)
    k = tl.load(k_base + k_rows.to(tl.int64)[:, None] * stride_kn + offs_d[None, :],
                mask=(k_rows < key_rows)[:, None] & d_ok[None, :], other=0.0)
    if FP8:  # float8 tensor cores accumulate in fewer bits than float32 unless promoted every FP8_PROMOTE
        return tl.dot(q, tl.trans(k), max_num_imprecise_acc=FP8_PROMOTE)
    return mma(q, tl.trans(k), DOT_PRECISION, UPCAST)


@triton.jit
def _logits(
    q_base, k_base, stride_qn, stride_kn, row, row_ok, cols, seq_len, key_rows, block, offs_d, d_ok, qk_scale,
    ROWS: tl.constexpr, BLOCK_C: tl.constexpr, STRIDE: tl.constexpr, POOLED: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """[ROWS, BLOCK_C] logits in log2 units; -inf where a column is not scored or the logit is not finite."""
    s = tl.zeros([ROWS, BLOCK_C], dtype=tl.float32)
    for i in range(STRIDE):  # a loop, not unrolled: unrolled, 64 rows x 8 strides passed the shared memory
        s += _slice_product(q_base, k_base, stride_qn, stride_kn, row, cols, i, seq_len, key_rows, offs_d, d_ok,
                            STRIDE, DOT_PRECISION, UPCAST)
    s = s * qk_scale
    if POOLED:
        key_end = tl.minimum((cols + 1) * block, seq_len) - 1  # a block is scored once its last key is
        scored = (key_end[None, :] <= row[:, None]) & (cols < key_rows)[None, :]
    else:
        scored = cols[None, :] <= row[:, None]  # causal, tile by tile
    finite = (s == s) & (tl.abs(s) < float("inf"))
    return tl.where(scored & row_ok[:, None] & finite, s, float("-inf"))


@triton.jit
def _pooled_one_pass(
    q_base, k_base, stride_qn, stride_kn, row, row_ok, col_end, seq_len, key_rows, block, offs_d, d_ok, qk_scale,
    out_row, Tops, top_base, Stats, stat_base,
    ROWS: tl.constexpr, BLOCK_C: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """One query block's pooled scores, unnormalised: column tile t's masses against the running maximum after
    tile t (stored at Tops[top_base + t]); the final maximum and sum at Stats[stat_base], [stat_base + 1]."""
    top = tl.max(tl.full([ROWS], -1.0e30, dtype=tl.float32), 0)  # finite: an all -inf tile gives p = 0, no NaN
    total = tl.sum(tl.zeros([ROWS], dtype=tl.float32), 0)
    for c0 in range(0, col_end, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        s = _logits(q_base, k_base, stride_qn, stride_kn, row, row_ok, cols, seq_len, key_rows, block, offs_d,
                    d_ok, qk_scale, ROWS, BLOCK_C, 1, True, DOT_PRECISION, UPCAST)
        new_top = tl.maximum(top, tl.max(tl.max(s, 1), 0))
        mass = tl.sum(tl.math.exp2(s - new_top), 0)  # [BLOCK_C]: each pooled key block's share, summed over rows
        total = total * tl.math.exp2(top - new_top) + tl.sum(mass, 0)
        top = new_top
        tl.store(out_row + cols, mass, mask=cols < key_rows)
        tl.store(Tops + top_base + c0 // BLOCK_C, top)
    tl.store(Stats + stat_base, top)
    tl.store(Stats + stat_base + 1, total)


@triton.jit
def _block_mass_kernel(
    Q, K, Out, Tops, Stats, Lse, Dequant,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    seq_len, key_rows, num_q_heads, q_per_kv, num_blocks, out_cols, col_tiles, block, qk_scale,
    tile_start, bh_start, chunk_rows,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr, ROWS_PER_QB: tl.constexpr,
    BLOCK_C: tl.constexpr, COLS_PER_KB: tl.constexpr, STRIDE: tl.constexpr, POOLED: tl.constexpr,
    LSE_COLS: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, FP8: tl.constexpr,
    FP8_PROMOTE: tl.constexpr,
):
    """Out[bh, query block, key block] for the ROWS rows of one program (last rows first: they read the most).
    The launch covers tiles and heads from ``tile_start`` and ``bh_start`` (antidiagonal: as many as its scratch
    holds, ``chunk_rows`` rows per head)."""
    tile = tile_start + tl.num_programs(0) - 1 - tl.program_id(0)
    bh = bh_start + tl.program_id(1).to(tl.int64)
    b, h = bh // num_q_heads, bh % num_q_heads
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + (h // q_per_kv) * stride_kh
    row = tile * ROWS + tl.arange(0, ROWS)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    if POOLED:  # the program is one query block: pooled key blocks up to its own
        block_row = bh * num_blocks + tile
        _pooled_one_pass(q_base, k_base, stride_qn, stride_kn, row, row < seq_len, tile + 1, seq_len, key_rows,
                         block, offs_d, d_ok, qk_scale, Out + block_row * out_cols, Tops, block_row * col_tiles,
                         Stats, block_row * 2, ROWS, BLOCK_C, DOT_PRECISION, UPCAST)
        return
    row_ok = row * STRIDE < seq_len  # a tile row of padding only adds nothing
    if FP8:  # q and k were scaled per head into float8's range: the logits scale back
        qk_scale = qk_scale * tl.load(Dequant + bh)
    col_end = tile * ROWS + ROWS  # key tiles up to the program's last tile row
    # This program's rows in the scratch: each row's log2-sum-exp2 of its logits per key block.
    row_lse = Lse + ((bh - bh_start) * chunk_rows + (tile - tile_start) * ROWS + tl.arange(0, ROWS).to(tl.int64)
                     )[:, None] * num_blocks
    m_i = tl.full([ROWS], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    KB: tl.constexpr = BLOCK_C // COLS_PER_KB
    # One loop over (column tile, stride slice) pairs: the pipeliner prefetches across column tiles instead of
    # refilling an inner loop of STRIDE steps at each; a tile's logits are complete at its last slice.
    s = tl.zeros([ROWS, BLOCK_C], dtype=tl.float32)
    for step in range(0, tl.cdiv(col_end, BLOCK_C) * STRIDE):
        i = step % STRIDE
        c0 = step // STRIDE * BLOCK_C
        cols = c0 + tl.arange(0, BLOCK_C)
        s += _slice_product(q_base, k_base, stride_qn, stride_kn, row, cols, i, seq_len, key_rows, offs_d, d_ok,
                            STRIDE, DOT_PRECISION, UPCAST, FP8, FP8_PROMOTE)
        if i == STRIDE - 1:
            logits = s * qk_scale
            finite = (logits == logits) & (tl.abs(logits) < float("inf"))
            logits = tl.where((cols[None, :] <= row[:, None]) & row_ok[:, None] & finite, logits, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(logits, 1))
            p = tl.math.exp2(logits - m_new[:, None])
            l_i = l_i * tl.math.exp2(m_i - m_new) + tl.sum(p, 1)
            m_i = m_new
            block_sums = tl.sum(tl.reshape(p, (ROWS, KB, COLS_PER_KB)), 2)  # against the running maximum
            key_blocks = c0 // COLS_PER_KB + tl.arange(0, KB)
            # -inf where a key block has no logit (masked, or below float32's range): it adds no mass.
            lse = tl.where(block_sums > 0, m_new[:, None] + tl.math.log2(tl.where(block_sums > 0, block_sums, 1.0)),
                           float("-inf"))
            tl.store(row_lse + key_blocks[None, :], lse, mask=(key_blocks < num_blocks)[None, :])
            s = tl.zeros([ROWS, BLOCK_C], dtype=tl.float32)
    inv_l = tl.where(l_i > 0, 1.0 / tl.where(l_i > 0, l_i, 1.0), 0.0)
    QB: tl.constexpr = ROWS // ROWS_PER_QB
    query_blocks = tile * QB + tl.arange(0, QB)
    out_base = Out + bh * num_blocks * out_cols + query_blocks.to(tl.int64)[:, None] * out_cols
    kb_end = tl.minimum((tile + 1) * QB, num_blocks)  # the key blocks the first loop stored
    for b0 in range(0, kb_end, LSE_COLS):
        key_blocks = b0 + tl.arange(0, LSE_COLS)
        stored = key_blocks < kb_end
        lse = tl.load(row_lse + key_blocks[None, :], mask=stored[None, :], other=float("-inf"))
        p = tl.math.exp2(lse - m_i[:, None]) * inv_l[:, None]
        mass = tl.sum(tl.reshape(p, (QB, ROWS_PER_QB, LSE_COLS)), 1)  # [QB, LSE_COLS]
        tl.store(out_base + key_blocks[None, :], mass, mask=(query_blocks < num_blocks)[:, None] & stored[None, :])


def _launch(q: torch.Tensor, keys: torch.Tensor, num_blocks: int, block: int, rows_per_qb: int, cols_per_kb: int,
            total_rows: int, key_rows: int, stride: int, pooled: bool, qk_scale: float, float8: bool = False
            ) -> torch.Tensor:
    problems = _input_problems(q, block, stride, pooled)
    if problems:
        raise ValueError(f"block mass kernel: {'; '.join(problems)}")
    q, keys = last_dim_contiguous(q), last_dim_contiguous(keys)
    dequant = None  # float8 products: per (batch, query head), the factor that takes the logits back
    if float8:
        q, keys, dequant = _float8_inputs(q, keys)
    batch, num_q, seq_len, head_dim = q.shape
    rows = rows_per_qb if pooled else max(_MIN_ROWS, rows_per_qb)
    cols = max(_POOLED_COLS if pooled else _ANTIDIAGONAL_COLS, cols_per_kb)
    col_tiles = triton.cdiv(num_blocks, cols) if pooled else 1
    # Pooled: rows padded to whole column tiles, so each tile can be rescaled as one slice; an unvisited tile's
    # maximum stays -inf and its factor 0 (its masses are 0 too).
    out = torch.zeros(batch, num_q, num_blocks, col_tiles * cols if pooled else num_blocks, dtype=torch.float32,
                      device=q.device)
    # A float8 dot reads no precision; "ieee" keeps the compiled kernel's constants what they were measured with.
    dot_precision, upcast = ("ieee", False) if dequant is not None else dot_settings(q.dtype)
    block_d = triton.next_power_of_2(head_dim)
    settings = dict(
        HEAD_DIM=head_dim, BLOCK_D=block_d, ROWS=rows, ROWS_PER_QB=rows_per_qb,
        BLOCK_C=cols, COLS_PER_KB=cols_per_kb, STRIDE=stride, POOLED=pooled, LSE_COLS=_LSE_COLS,
        DOT_PRECISION=dot_precision, UPCAST=upcast, num_warps=4 if rows <= 64 else 8,
        num_stages=2 if pooled else _STAGES, **FP_FUSION,
        FP8=dequant is not None, FP8_PROMOTE=None if _FLOAT8_PROMOTE is None else min(_FLOAT8_PROMOTE, block_d),
    )
    arguments = (q.stride(0), q.stride(1), q.stride(2), keys.stride(0), keys.stride(1), keys.stride(2),
                 seq_len, key_rows, num_q, num_q // keys.shape[1], num_blocks, out.shape[-1], col_tiles, block,
                 qk_scale * LOG2E)
    tiles, heads = triton.cdiv(total_rows, rows), batch * num_q
    if pooled:
        # Each tile's running maximum, and each query block's final maximum and sum.
        tops = torch.full((batch, num_q, num_blocks, col_tiles), float("-inf"), device=q.device)
        stats = torch.zeros(batch, num_q, num_blocks, 2, device=q.device)
        _block_mass_kernel[(tiles, heads)](q, keys, out, tops, stats, out, out, *arguments, 0, 0, 0, **settings)
        return _rescaled(out, tops, stats)
    # Antidiagonal: one float32 per tile row and key block in the scratch; launches over as many tiles, then
    # heads, as it holds (at 128k, 32 heads, stride 8: 64 MiB a head). Tops and Stats are not read.
    tile_bytes = rows * num_blocks * 4
    tiles_each = max(1, min(tiles, _SCRATCH_BYTES // tile_bytes))
    heads_each = max(1, min(heads, _SCRATCH_BYTES // (tile_bytes * tiles))) if tiles_each == tiles else 1
    lse = torch.empty(heads_each * tiles_each * tile_bytes // 4, dtype=torch.float32, device=q.device)
    for bh_start in range(0, heads, heads_each):
        for tile_start in range(0, tiles, tiles_each):
            grid = (min(tiles_each, tiles - tile_start), min(heads_each, heads - bh_start))
            _block_mass_kernel[grid](q, keys, out, out, out, lse, out if dequant is None else dequant, *arguments,
                                     tile_start, bh_start, tiles_each * rows, **settings)
    return out


def _float8_inputs(q: torch.Tensor, k: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """q and k rounded to float8 e4m3 (:mod:`~sparse_prefill.kernels.float8`) and, per (batch, query head), the
    product of their scales, which takes the logits back. Where tensor cores cannot multiply float8: the same
    rounded values in bfloat16 (times a power of two, exact) and None."""
    q8, q_unit = float8_rounded(q)
    k8, k_unit = float8_rounded(k)
    if not float8_dot_supported(q.device):
        return float8_values(q8, q_unit, torch.bfloat16), float8_values(k8, k_unit, torch.bfloat16), None
    group = q.shape[1] // k.shape[1]
    return q8, k8, (q_unit * k_unit.repeat_interleave(group, dim=1)).contiguous()


def _rescaled(out: torch.Tensor, tops: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
    """The pooled path's column tiles rescaled to their query block's final maximum and sum."""
    batch, num_q, num_blocks, col_tiles = tops.shape
    cols = out.shape[-1] // col_tiles
    top, total = stats.unbind(-1)
    factor = torch.where(total[..., None] > 0, torch.exp2(tops - top[..., None]) / total[..., None], 0.0)
    out.view(batch, num_q, num_blocks, col_tiles, cols).mul_(factor[..., None])
    return out[..., :num_blocks]


def antidiagonal_block_mass(q: torch.Tensor, k: torch.Tensor, scale: float, block: int, stride: int,
                            float8: bool = False) -> torch.Tensor:
    """[B, Hq, nb, nb] float32: xattention's softmaxed antidiagonal scores summed per (query block, key block),
    zero above the diagonal. q [B, Hq, N, D], k [B, Hkv, N, D] (GQA read in place); ``block // stride`` a power
    of two. ``float8``: the scores of q and k rounded to float8 e4m3 per head
    (:func:`~sparse_prefill.kernels.float8.float8_rounded_reference`), multiplied by float8 tensor cores where the
    GPU has them."""
    num_blocks = -(-q.shape[2] // block)
    tiles = num_blocks * block // stride
    return _launch(q, k, num_blocks, block, block // stride, block // stride, tiles, k.shape[2], stride, False,
                   scale / stride, float8)


def pooled_block_scores(q: torch.Tensor, pooled: torch.Tensor, scale: float, block: int) -> torch.Tensor:
    """[B, Hq, nb, nb] float32: flashprefill's block scores. ``pooled`` [B, Hkv, nb, D]: each key block's mean key
    in q's dtype; ``block`` a power of two."""
    num_blocks = pooled.shape[2]
    return _launch(q, pooled, num_blocks, block, block, 1, num_blocks * block, num_blocks, 1, True, scale)
