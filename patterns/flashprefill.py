"""`flashprefill`: FlashPrefill's pooled-key block search with a max-relative threshold (arXiv 2603.06199),
a baseline beside `anchor`.

Each key block is pooled to its mean key. The rows of a query block score every pooled key block
that lies wholly at or before them (``scale * q . mean_k``); one softmax over all those (row,
block) pairs, summed per key block, gives the query block's block scores. A key block is kept
when its score is at least ``alpha`` times the best one of its query block: no sort, no running
sum. Besides the scored blocks, every query block keeps the first ``sink`` key blocks (vertical
lines near the start), its ``window`` nearest key blocks, the diagonal included (the slash lines
near the diagonal), and the last ``last`` query blocks keep every key block. Vertical and slash
lines farther away show up in the block scores themselves: a column of kept blocks is a vertical
line, a diagonal of them a slash; the paper finds them with the same one pass, not a separate
detector. ``alpha`` 0 keeps every block.

Expressed as a :class:`~sparse_prefill.plan.BlockPlan`, one key-block list per query head (the
selection is whole blocks: its exact form, ``block`` times smaller than a StripePlan listing the
keys). The Triton block executor runs it on CUDA devices, the reference executor anywhere.

Decided where the published method leaves room:

* A partial last key block is pooled over its real keys, and counts as before a row once its last
  real key is.
* Non-finite scores count as no mass (:func:`~sparse_prefill.patterns._blocks.finite_softmax`): a
  query block without a finite score keeps only its sink, window and last blocks; a key block
  holding a NaN or infinite key is kept wherever causal, so its NaN reaches the rows that attend it.
* A plan denser than ``dense_above`` runs as dense attention, as the other patterns' do.

:func:`flashprefill_block_mask_reference` is the specification (one head, a plain loop over query
blocks); :class:`FlashPrefillIdentifier` computes the same masks for all heads at once: on a GPU the
block scores in one Triton kernel (:mod:`~sparse_prefill.patterns.block_mass`), elsewhere in PyTorch
(:func:`flashprefill_block_scores`, in chunks of query rows whose scores stay under 256 MiB); one
host sync sizes the plan, after its executor is launched where the caller defers sizing (docs/architecture.md).
"""

from __future__ import annotations

import torch

from sparse_prefill.interfaces import AttentionContext, Identifier, Parameter, PatternSpec
from sparse_prefill.patterns import _blocks
from sparse_prefill.patterns._checks import at_least, density, multiple_of
from sparse_prefill.patterns.block_mass import block_mass_problems, pooled_block_scores
from sparse_prefill.plan import BlockPlan, DensePlan, PendingPlan
from sparse_prefill.validation import validate_attention_inputs

__all__ = ["FLASHPREFILL", "FlashPrefillIdentifier", "flashprefill_block_mask_reference", "flashprefill_block_masks",
           "flashprefill_block_scores", "flashprefill_keep"]


def _alpha(value: float) -> str | None:
    return None if 0 <= value <= 1 else "must be in [0, 1] (0: every block, dense attention)"


def _static_blocks(num_blocks: int, sink: int, window: int, last: int, device: torch.device | str) -> torch.Tensor:
    """[nb, nb] bool: the sink, window (diagonal included) and last-query-block blocks, causal."""
    query_block = torch.arange(num_blocks, device=device)[:, None]
    key_block = torch.arange(num_blocks, device=device)[None, :]
    distance = query_block - key_block
    static = (key_block < sink) | (distance < max(window, 1)) | (query_block >= num_blocks - last)
    return static & (distance >= 0)


def _pooled_key_ends(seq_len: int, block: int, device: torch.device | str) -> torch.Tensor:
    """[nb] the last real key of each key block: a row scores the pooled block once it is at or past it."""
    starts = torch.arange(-(-seq_len // block), device=device) * block
    return torch.clamp(starts + block, max=seq_len) - 1


def flashprefill_block_mask_reference(q: torch.Tensor, k: torch.Tensor, scale: float, alpha: float, block: int,
                                      sink: int, window: int, last: int) -> torch.Tensor:
    """[nb, nb] bool: the key blocks each query block keeps, for one query head q [N, D] and its key
    head k [N, D]. Plain and slow on purpose: the specification the identifier is tested against."""
    seq_len = q.shape[0]
    num_blocks = -(-seq_len // block)
    pooled = _blocks.block_means(k, block)  # [nb, D]
    key_ends = _pooled_key_ends(seq_len, block, q.device)
    mask = _static_blocks(num_blocks, sink, window, last, q.device)
    for query_block in range(num_blocks):
        rows = torch.arange(query_block * block, min((query_block + 1) * block, seq_len), device=q.device)
        logits = (q[rows].float() @ pooled.T) * scale
        logits[key_ends[None, :] > rows[:, None]] = float("-inf")  # a pooled block wholly before the row
        scores = _blocks.finite_softmax(logits.flatten()).view(logits.shape).sum(dim=0)  # one softmax per query block
        best = scores.max()
        if best > 0:
            mask[query_block] |= scores >= alpha * best
    bad = _blocks.nonfinite_key_blocks(k, block)[None, :]
    return (mask | bad) & _blocks.causal_blocks(num_blocks, q.device)


def flashprefill_block_scores(q: torch.Tensor, k: torch.Tensor, scale: float, block: int) -> torch.Tensor:
    """[B, Hq, nb, nb] float32: each query block's softmax over its (row, pooled key block) scores, summed per key
    block, for every query head at once (q [B, Hq, N, D], k [B, Hkv, N, D] read in place for GQA); no host
    sync. The PyTorch version of :func:`~sparse_prefill.patterns.block_mass.pooled_block_scores`."""
    batch, num_q, seq_len, dim = q.shape
    num_kv = k.shape[1]
    group = num_q // num_kv
    num_blocks = -(-seq_len // block)
    pooled = _blocks.block_means(k, block)[:, :, None].transpose(-1, -2)  # [B, Hkv, 1, D, nb]
    key_ends = _pooled_key_ends(seq_len, block, q.device)
    row = torch.arange(num_blocks * block, device=q.device)
    scores = torch.zeros(batch, num_kv, group, num_blocks, num_blocks, device=q.device)
    for start, end in _blocks.row_chunks(num_blocks * block, block, batch * num_q * num_blocks):
        queries = _blocks.rows_float(q, start, end).view(batch, num_kv, group, -1, dim)
        logits = (queries @ pooled) * scale
        unscored = (key_ends[None, :] > row[start:end, None]) | (row[start:end, None] >= seq_len)
        logits.masked_fill_(unscored, float("-inf"))
        per_block = logits.view(batch, num_kv, group, -1, block * num_blocks)  # one softmax per query block
        probs = _blocks.finite_softmax(per_block).view(batch, num_kv, group, -1, block, num_blocks)
        scores[:, :, :, start // block:end // block] = probs.sum(dim=-2)
    return scores.view(batch, num_q, num_blocks, num_blocks)


def flashprefill_keep(scores: torch.Tensor, k: torch.Tensor, alpha: float, block: int, sink: int, window: int,
                      last: int) -> torch.Tensor:
    """[B, Hq, nb, nb] bool: the key blocks whose ``scores`` reach ``alpha`` times their query block's best, the
    sink, window and last blocks, and every causal key block holding a non-finite key of k."""
    num_blocks = scores.shape[-1]
    group = scores.shape[1] // k.shape[1]
    best = scores.amax(dim=-1, keepdim=True)
    kept = (scores >= alpha * best) & (best > 0)
    static = _static_blocks(num_blocks, sink, window, last, scores.device)
    bad = _blocks.nonfinite_key_blocks(k, block).repeat_interleave(group, dim=1)[:, :, None, :]
    return (kept | static | bad) & _blocks.causal_blocks(num_blocks, scores.device)


def flashprefill_block_masks(q: torch.Tensor, k: torch.Tensor, scale: float, alpha: float, block: int, sink: int,
                             window: int, last: int) -> torch.Tensor:
    """[B, Hq, nb, nb] bool: :func:`flashprefill_block_mask_reference` for every query head at once
    (q [B, Hq, N, D], k [B, Hkv, N, D] read in place for GQA); no host sync. The scores come from the Triton
    kernel where it runs (CUDA, half or single precision, ``block`` a power of two up to 128; the pooled keys
    rounded to q's dtype), from :func:`flashprefill_block_scores` elsewhere."""
    if block_mass_problems(q, block, pooled=True):
        scores = flashprefill_block_scores(q, k, scale, block)
    else:
        scores = pooled_block_scores(q, _blocks.block_means(k, block).to(q.dtype), scale, block)
    return flashprefill_keep(scores, k, alpha, block, sink, window, last)


class FlashPrefillIdentifier(Identifier):
    """Pooled-key block scores of every query head at once, kept blocks listed per query head."""

    def __init__(self, alpha: float, block: int, sink: int, window: int, last: int, dense_above: float) -> None:
        self.alpha, self.block, self.sink, self.window, self.last = alpha, block, sink, window, last
        self.dense_above = dense_above

    def identify(self, q: torch.Tensor, k: torch.Tensor, ctx: AttentionContext) -> BlockPlan | DensePlan | PendingPlan:
        validate_attention_inputs(q, k, k)  # identification reads no v
        with torch.no_grad():
            mask = flashprefill_block_masks(q, k, ctx.scale, self.alpha, self.block, self.sink, self.window, self.last)
        return _blocks.block_plan(mask, q.shape[2], self.block, k.shape[1], ctx, self.dense_above)


FLASHPREFILL = PatternSpec(
    name="flashprefill",
    description="FlashPrefill: pooled-key block scores kept at or above alpha times the best, plus sink and window "
                "(baseline)",
    parameters={
        "alpha": Parameter(float, 0.18, "a key block is kept at or above alpha times its query block's best score",
                           _alpha),
        "block": Parameter(int, 128, "rows of a query block and keys of a key block (multiple of 16)", multiple_of(16)),
        "sink": Parameter(int, 2, "first key blocks every query block keeps", at_least(0)),
        "window": Parameter(int, 4, "nearest key blocks every query block keeps, its diagonal block included",
                            at_least(1)),
        "last": Parameter(int, 2, "last query blocks that keep every key block", at_least(0)),
        "dense_above": Parameter(float, 0.4, "plans denser than this run as dense attention (faster there, and exact)",
                                 density),
    },
    make_identifier=FlashPrefillIdentifier,
)
