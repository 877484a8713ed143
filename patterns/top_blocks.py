"""Each query block's best earlier key blocks, listed in one Triton kernel: `block-topk`'s selection.

`block-topk` keeps, per query block, the ``keep`` best-scoring key blocks before it and its diagonal block. In
PyTorch that is a masked copy of the [nb, nb] score matrix per head, ``torch.topk`` over every row, and a sort of
the chosen indices (on an H100 at 128k, 32 heads: 6.0 of the identification's 7.8 ms). Here a program holds one
row of the score matrix in registers (several under the interpreter), finds its ``keep``-th largest score by
bisection on the scores' bits (an order-preserving map of float32 to int32: at most 32 counting passes over
registers, no sort), then writes the kept blocks in ascending order by a prefix sum: the rows
:func:`~sparse_prefill.patterns._blocks.list_plan` takes, with no [nb, nb] mask and no sort (same H100 and
shapes: 1.18 ms against 5.19, docs/benchmarks/block_topk_stages_h100.json and, for torch, the record
block_topk_select_kernel_ab_h100.json in git at 055827e).

Ties at the threshold go to the earlier blocks (``torch.topk`` leaves them unspecified). A score that is not
finite never wins a place; a row with at most ``keep`` finite earlier scores keeps all of them. The PyTorch
function it is tested against: ``_top_block_lists_torch`` in patterns/block_topk.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparse_prefill.kernels.attention_tiles import INTERPRET
from sparse_prefill.kernels.runtime import FP_FUSION

__all__ = ["top_block_lists", "top_block_problems"]

# One row per program, 16 scores per thread (warps as the row needs, at most 16): on an H100, 32 heads, 1.18 ms at
# 128k against 1.49 for two rows of 32 per thread, and 0.064 ms at 32k against 0.147 for eight rows of 32
# (docs/benchmarks/block_topk_stages_h100.json). More rows per program were slower at every size measured.
_VALUES_PER_THREAD = 16
_MAX_WARPS = 16


def top_block_problems(x: torch.Tensor) -> list[str]:
    """Why the kernel cannot list scores on x's device (empty: it can); the caller then selects in PyTorch."""
    return [] if x.device.type == "cuda" else [f"device {x.device.type} (the kernel runs on CUDA)"]


@triton.jit
def _ordered_bits(x):
    """float32 -> int32 in the same order (negative floats have their magnitude bits flipped)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def _top_blocks_kernel(
    Scores, Out, stride_row, num_rows, num_blocks, keep, width, scale,
    ROWS: tl.constexpr, BLOCKS: tl.constexpr, WIDTH: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < num_rows
    query_block = rows % num_blocks
    cols = tl.arange(0, BLOCKS)
    earlier = (cols[None, :] < query_block[:, None]) & row_ok[:, None]
    scores = tl.load(Scores + rows.to(tl.int64)[:, None] * stride_row + cols[None, :], mask=earlier, other=0.0)
    scores = scores * scale  # the float32 product PyTorch would store: the same order and the same ties
    finite = earlier & (scores == scores) & (tl.abs(scores) < float("inf"))
    key = _ordered_bits(scores)
    candidates = tl.sum(finite.to(tl.int32), axis=1)

    # A threshold t per row with at least keep keys >= t and at most keep keys > t; by bisection between the
    # smallest candidate (count: all of them) and the largest + 1 (count: none). A row stops once exactly keep
    # keys are >= mid (about 18 passes on real scores instead of 32), or where it has keep candidates or fewer.
    lo = tl.min(tl.where(finite, key, 0x7FFFFFFF), axis=1).to(tl.int64)
    hi = tl.max(tl.where(finite, key, -0x7FFFFFFF), axis=1).to(tl.int64) + 1
    active = (candidates > keep) & (hi - lo > 1)
    while tl.max(active.to(tl.int32), axis=0) > 0:
        mid = (lo + (hi - lo) // 2).to(tl.int32)  # within the keys' int32 range; hi - lo may not be
        count = tl.sum((finite & (key >= mid[:, None])).to(tl.int32), axis=1)
        enough = count >= keep
        lo = tl.where(active & enough, mid.to(tl.int64), lo)
        hi = tl.where(active & ~enough, mid.to(tl.int64), hi)
        active = active & (count != keep) & (hi - lo > 1)
    threshold = lo.to(tl.int32)[:, None]
    above = finite & (key > threshold)
    tie = finite & (key == threshold)
    room = keep - tl.sum(above.to(tl.int32), axis=1)
    kept = above | (tie & (tl.cumsum(tie.to(tl.int32), axis=1) <= room[:, None]))
    kept = tl.where((candidates <= keep)[:, None], finite, kept)
    kept = kept | ((cols[None, :] == query_block[:, None]) & row_ok[:, None])

    out_rows = Out + rows.to(tl.int64)[:, None] * width
    place = tl.cumsum(kept.to(tl.int32), axis=1) - 1
    tl.store(out_rows + place, cols[None, :] + tl.zeros_like(place), mask=kept)
    listed = tl.sum(kept.to(tl.int32), axis=1)
    slots = tl.arange(0, WIDTH)
    empty = (slots[None, :] >= listed[:, None]) & (slots[None, :] < width) & row_ok[:, None]
    tl.store(out_rows + slots[None, :], num_blocks + tl.zeros_like(slots[None, :] + listed[:, None]), mask=empty)


def _interpreted_rows(blocks: int) -> int:
    """Rows per program under the interpreter, where each program costs time of its own (one row per program
    took the CPU tests 14 times as long); the kernel is the same for any power of two."""
    return max(1, min(16, 4096 // blocks))


def top_block_lists(scores: torch.Tensor, keep: int, scale: float = 1.0) -> torch.Tensor:
    """[..., nb, min(keep + 1, nb + 1)] int64 from scores [..., nb, nb] (float32; query block, key block): each
    row's ``keep`` best finite ``scale * scores`` among the key blocks before it and its own diagonal block,
    ascending, then ``nb`` in every empty place. Rows are read in place where the key blocks are contiguous;
    the scale is applied as they are read (a pass over the scores saved where the caller would apply it)."""
    if scores.dtype != torch.float32:
        raise ValueError(f"top_block_lists takes float32 scores, got {scores.dtype}")
    num_blocks = scores.shape[-1]
    if scores.shape[-2] != num_blocks:
        raise ValueError(f"top_block_lists takes square [..., nb, nb] scores, got shape {tuple(scores.shape)}")
    if keep < 0:
        raise ValueError(f"keep must be >= 0, got {keep}")
    keep = min(keep, num_blocks)
    width = keep + 1
    rows = scores.reshape(-1, num_blocks)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape[0], width, dtype=torch.int64, device=scores.device)
    if rows.shape[0] == 0:
        return out.view(*scores.shape[:-1], width)
    blocks = triton.next_power_of_2(num_blocks)
    warps = min(_MAX_WARPS, max(1, blocks // (32 * _VALUES_PER_THREAD)))
    rows_per_program = _interpreted_rows(blocks) if INTERPRET else 1
    grid = (triton.cdiv(rows.shape[0], rows_per_program),)
    _top_blocks_kernel[grid](rows, out, rows.stride(0), rows.shape[0], num_blocks, keep, width, float(scale),
                             ROWS=rows_per_program, BLOCKS=blocks, WIDTH=triton.next_power_of_2(width), num_warps=warps,
                             **FP_FUSION)
    return out.view(*scores.shape[:-1], width)
