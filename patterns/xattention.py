"""`xattention`: XAttention's antidiagonal block scoring (arXiv 2503.16428), a baseline beside `anchor`.

Every ``stride x stride`` tile of a head's attention matrix is scored by one antidiagonal: the dot
products of query ``r * stride + stride - 1 - i`` with key ``c * stride + i``, summed over ``i``
(every row and every column of the tile is read once: a vertical line always crosses it, and, the
paper's argument, slash lines cross the antidiagonals of their tiles). Scaled like attention and
divided by ``stride`` (their mean), the tile scores of one query tile row are softmaxed over its
causal key tiles, and summed per ``block x block`` block. Each query block keeps its largest key
blocks until they hold ``threshold`` of its total score (the block that crosses it included);
``threshold`` 1 keeps every block.

Expressed as a :class:`~sparse_prefill.plan.BlockPlan`, one key-block list per query head: the
selection is whole blocks, so this is its exact form (a StripePlan would list ``block`` keys per
kept block: ``block`` times the memory for the same mask). The Triton block executor runs it on
CUDA devices, the reference executor anywhere.

Decided where the published method leaves room:

* The first key block and the diagonal block are always kept (every row then attends a key).
* Lengths are padded with zero rows to a multiple of ``block``; tile rows made of padding only
  are dropped, a partial tile's padding adds zero to its antidiagonal.
* The diagonal tile is scored whole (its antidiagonal crosses the causal boundary): the estimate
  is per tile, the causal mask is applied exactly by the executor.
* Non-finite scores count as no mass (:func:`finite_softmax`): a NaN query row leaves every other
  query block's selection alone; a key block holding a NaN or infinite key is kept wherever
  causal, so its NaN reaches the rows that attend it, as in dense attention.
* A plan denser than ``dense_above`` runs as dense attention, as the other patterns' do.
* ``float8_scores`` (ours): the antidiagonals are scored from q and k rounded to float8 e4m3
  with a power-of-two scale per head (:func:`~sparse_prefill.kernels.float8.float8_rounded_reference`), on float8
  tensor cores where the GPU has them. On the calibrated 128k inputs (H100) it identifies in 20 ms instead of 33,
  and 0.3% of the kept blocks differ; at 32k it is slower (docs/benchmarks/xattention_float8_h100.json). The rule
  is otherwise the same, applied to the rounded q and k. Off by default, so that ``xattention`` is the paper's.

:func:`xattention_block_mask_reference` is the specification (one head, a plain loop over the
query blocks); :class:`XAttentionIdentifier` computes the same masks for all heads at once: on a GPU
the block mass in one Triton kernel (:mod:`~sparse_prefill.patterns.block_mass`), elsewhere in PyTorch
(:func:`xattention_block_mass`, in chunks of query rows whose scores stay under 256 MiB); one host
sync sizes the plan, after its executor is launched where the caller defers sizing (docs/architecture.md).
"""

from __future__ import annotations

import math

import torch

from sparse_prefill.interfaces import AttentionContext, Identifier, Parameter, PatternSpec
from sparse_prefill.kernels.float8 import float8_rounded_reference, float8_values
from sparse_prefill.patterns._blocks import (
    block_plan,
    causal_blocks,
    finite_softmax,
    kept_always,
    nonfinite_key_blocks,
    pad_rows,
    row_chunks,
    rows_float,
)
from sparse_prefill.patterns._checks import density, multiple_of
from sparse_prefill.patterns.block_mass import antidiagonal_block_mass, block_mass_problems
from sparse_prefill.plan import BlockPlan, DensePlan, PendingPlan
from sparse_prefill.validation import validate_attention_inputs

__all__ = ["XATTENTION", "XAttentionIdentifier", "xattention_block_mask_reference", "xattention_block_mass",
           "xattention_block_masks", "xattention_keep"]


def _threshold(value: float) -> str | None:
    return None if 0 < value <= 1 else "must be in (0, 1] (1: every block, dense attention)"


_STRIDES = (1, 2, 4, 8, 16)  # the divisors of 16: every stride divides every block (a multiple of 16)


def _stride(value: int) -> str | None:
    return None if value in _STRIDES else f"must be one of {', '.join(map(str, _STRIDES))} (it must divide block)"


def _check_geometry(block: int, stride: int) -> None:
    if block % stride:
        raise ValueError(f"xattention: block ({block}) must be a multiple of stride ({stride}); "
                         f"choose a stride that divides it")


def xattention_block_mask_reference(q: torch.Tensor, k: torch.Tensor, scale: float, block: int, stride: int,
                                    threshold: float) -> torch.Tensor:
    """[nb, nb] bool: the key blocks each query block keeps, for one query head q [N, D] and its key
    head k [N, D]. Plain and slow on purpose: the specification the identifier is tested against (with
    ``float8_scores``, on q and k rounded by :func:`~sparse_prefill.kernels.float8.float8_rounded_reference`)."""
    _check_geometry(block, stride)
    seq_len = q.shape[0]
    num_blocks = -(-seq_len // block)
    qp, kp = pad_rows(q, block), pad_rows(k, block)
    tiles = qp.shape[0] // stride
    # Antidiagonal of tile (r, c): sum over i of q[r * stride + stride - 1 - i] . k[c * stride + i].
    logits = torch.zeros(tiles, tiles, device=q.device)
    for i in range(stride):
        logits += qp[stride - 1 - i::stride] @ kp[i::stride].T
    logits = logits * scale / stride
    tile = torch.arange(tiles, device=q.device)
    logits[tile[None, :] > tile[:, None]] = float("-inf")  # causal, tile by tile
    probs = finite_softmax(logits)
    probs[-(-seq_len // stride):] = 0  # tile rows of padding only
    per_block = block // stride
    mass = probs.view(num_blocks, per_block, num_blocks, per_block).sum(dim=(1, 3))

    mask = kept_always(num_blocks, q.device) | nonfinite_key_blocks(k, block)[None, :]
    for query_block in range(num_blocks):
        row = mass[query_block, :query_block + 1]
        target = threshold * float(row.sum()) if threshold < 1 else math.inf
        covered = 0.0
        for key_block in torch.sort(row, descending=True, stable=True).indices.tolist():
            if covered >= target:
                break
            mask[query_block, key_block] = True
            covered += float(row[key_block])
    return mask & causal_blocks(num_blocks, q.device)


def xattention_block_mass(q: torch.Tensor, k: torch.Tensor, scale: float, block: int, stride: int) -> torch.Tensor:
    """[B, Hq, nb, nb] float32: each query block's softmaxed antidiagonal scores summed per key block (zero above
    the diagonal), for every query head at once (q [B, Hq, N, D], k [B, Hkv, N, D] read in place for GQA); no
    host sync. The PyTorch version of :func:`~sparse_prefill.patterns.block_mass.antidiagonal_block_mass`."""
    _check_geometry(block, stride)
    batch, num_q, seq_len, dim = q.shape
    num_kv = k.shape[1]
    group = num_q // num_kv
    num_blocks = -(-seq_len // block)
    tiles = num_blocks * block // stride
    # One tile row of q (reversed) and one tile column of k, each flattened: their dot product is
    # the tile's antidiagonal.
    k_tiles = pad_rows(k, block).view(batch, num_kv, 1, tiles, stride * dim).transpose(-1, -2)
    per_block = block // stride
    real_tiles = -(-seq_len // stride)
    tile = torch.arange(tiles, device=q.device)
    mass = torch.zeros(batch, num_kv, group, num_blocks, num_blocks, device=q.device)
    for start, end in row_chunks(tiles, per_block, batch * num_q * tiles):
        # Causal: tile rows [start, end) score key tiles [0, end) only (``end`` is a whole number of blocks);
        # the tiles after would be masked out, so skipping them halves the work and changes no score.
        q_tiles = rows_float(q, start * stride, end * stride).view(batch, num_kv, group, -1, stride, dim)
        logits = (q_tiles.flip(4).flatten(4) @ k_tiles[..., :end]) * (scale / stride)
        logits.masked_fill_(tile[None, :end] > tile[start:end, None], float("-inf"))
        probs = finite_softmax(logits)
        probs.masked_fill_((tile[start:end] >= real_tiles)[:, None], 0.0)
        key_blocks = end // per_block
        mass[:, :, :, start // per_block:key_blocks, :key_blocks] = probs.view(
            batch, num_kv, group, -1, per_block, key_blocks, per_block).sum(dim=(4, 6))
    return mass.view(batch, num_q, num_blocks, num_blocks)


def xattention_keep(mass: torch.Tensor, k: torch.Tensor, block: int, threshold: float) -> torch.Tensor:
    """[B, Hq, nb, nb] bool: from each query block's ``mass`` [B, Hq, nb, nb], its largest key blocks until they
    hold ``threshold`` of its total (the one crossing it included), the first and diagonal blocks, and every
    causal key block holding a non-finite key of k [B, Hkv, N, D]."""
    num_blocks = mass.shape[-1]
    group = mass.shape[1] // k.shape[1]
    causal = causal_blocks(num_blocks, mass.device)
    mass = mass.masked_fill(~causal, 0.0)
    ordered, order = torch.sort(mass, dim=-1, descending=True, stable=True)
    before = ordered.cumsum(dim=-1) - ordered  # mass of the larger blocks before each
    target = threshold * mass.sum(dim=-1, keepdim=True) if threshold < 1 else torch.full_like(before[..., :1], math.inf)
    keep = torch.zeros(mass.shape, dtype=torch.bool, device=mass.device).scatter_(-1, order, before < target)
    bad_keys = nonfinite_key_blocks(k, block).repeat_interleave(group, dim=1)[:, :, None, :]
    return (keep | kept_always(num_blocks, mass.device) | bad_keys) & causal


def xattention_block_masks(q: torch.Tensor, k: torch.Tensor, scale: float, block: int, stride: int,
                           threshold: float, float8_scores: bool = False) -> torch.Tensor:
    """[B, Hq, nb, nb] bool: :func:`xattention_block_mask_reference` for every query head at once
    (q [B, Hq, N, D], k [B, Hkv, N, D] read in place for GQA); no host sync. The block mass comes from the
    Triton kernel where it runs (CUDA, half or single precision, ``block // stride`` a power of two up to 64), from
    :func:`xattention_block_mass` elsewhere. ``float8_scores``: the mass of q and k rounded to float8 per head
    (elsewhere, of float32 copies of the rounded values)."""
    _check_geometry(block, stride)
    if not block_mass_problems(q, block, stride):
        mass = antidiagonal_block_mass(q, k, scale, block, stride, float8_scores)
    elif float8_scores:
        mass = xattention_block_mass(*(_float8_values(x) for x in (q, k)), scale, block, stride)
    else:
        mass = xattention_block_mass(q, k, scale, block, stride)
    return xattention_keep(mass, k, block, threshold)


def _float8_values(x: torch.Tensor) -> torch.Tensor:
    """x rounded to float8 per head, as float32 (the PyTorch path's copy)."""
    return float8_values(*float8_rounded_reference(x), torch.float32)


class XAttentionIdentifier(Identifier):
    """Antidiagonal block scores of every query head at once, kept blocks listed per query head."""

    def __init__(self, threshold: float, stride: int, block: int, dense_above: float,
                 float8_scores: bool = False) -> None:
        _check_geometry(block, stride)
        self.threshold, self.stride, self.block, self.dense_above = threshold, stride, block, dense_above
        self.float8_scores = float8_scores

    def identify(self, q: torch.Tensor, k: torch.Tensor, ctx: AttentionContext) -> BlockPlan | DensePlan | PendingPlan:
        validate_attention_inputs(q, k, k)  # identification reads no v
        with torch.no_grad():
            mask = xattention_block_masks(q, k, ctx.scale, self.block, self.stride, self.threshold,
                                          self.float8_scores)
        return block_plan(mask, q.shape[2], self.block, k.shape[1], ctx, self.dense_above)


XATTENTION = PatternSpec(
    name="xattention",
    description="XAttention: antidiagonal-scored key blocks covering threshold of each query block (baseline)",
    parameters={
        "threshold": Parameter(float, 0.9, "share of each query block's score its kept blocks cover", _threshold),
        "stride": Parameter(int, 8, "antidiagonal stride: one score per stride x stride tile", _stride),
        "block": Parameter(int, 128, "rows of a query block and keys of a key block (multiple of 16)", multiple_of(16)),
        "dense_above": Parameter(float, 0.4, "plans denser than this run as dense attention (faster there, and exact)",
                                 density),
        "float8_scores": Parameter(bool, False, "score from q and k rounded to float8 e4m3 per head (ours, not "
                                   "the paper's): float8 tensor cores where the GPU has them; 0.3% of kept blocks "
                                   "differ; faster at 128k, not at 32k (H100)"),
    },
    make_identifier=XAttentionIdentifier,
)
