"""`block-topk`: MInference's block-sparse pattern (arXiv 2407.02490): the top key blocks by pooled score.

Queries and keys are mean-pooled per ``block`` rows; each query block scores every causal key
block by ``scale * mean_q . mean_k`` and keeps its ``blocks`` highest, its own diagonal block
counted among them and always kept (every row then attends a key). ``blocks`` at least the
number of blocks keeps every block (dense attention). This is the pattern `convert-minference`
maps MInference's ``block_sparse`` heads to (MInference: top 100 blocks of 64).

Expressed as a :class:`~sparse_prefill.plan.BlockPlan`, one key-block list per query head. Decided
here: a score that is not finite (a pooled row or key with a NaN) never wins a place, and a key
block holding a NaN or infinite key is kept wherever causal, so its NaN reaches the rows that
attend it, as in dense attention; a plan denser than ``dense_above`` runs as dense attention.

:func:`block_topk_mask_reference` is the specification (one head, a loop over query blocks);
:class:`BlockTopkIdentifier` computes all heads at once ((N / block)^2 scores per head, the
same as the reference) and lists each query block's ``blocks`` key blocks without an [nb, nb] mask,
with one host sync to size the plan (two where a key holds a NaN or infinity, or a key block's
float32 sum overflows; where the caller defers sizing, the sync comes after the executor is launched and such a
plan resolves dense instead, docs/architecture.md).
"""

from __future__ import annotations

import torch

from sparse_prefill.interfaces import AttentionContext, Identifier, Parameter, PatternSpec
from sparse_prefill.patterns import _blocks
from sparse_prefill.patterns._checks import at_least, density, multiple_of
from sparse_prefill.patterns.top_blocks import top_block_lists, top_block_problems
from sparse_prefill.plan import BlockPlan, DensePlan, PendingPlan
from sparse_prefill.validation import validate_attention_inputs

__all__ = ["BLOCK_TOPK", "BlockTopkIdentifier", "block_topk_lists", "block_topk_mask_reference", "block_topk_masks"]


def block_topk_mask_reference(q: torch.Tensor, k: torch.Tensor, scale: float, blocks: int, block: int) -> torch.Tensor:
    """[nb, nb] bool: the key blocks each query block keeps, for one query head q [N, D] and its key
    head k [N, D]. Plain and slow on purpose: the specification the identifier is tested against."""
    scores = (_blocks.block_means(q, block) @ _blocks.block_means(k, block).T) * scale
    num_blocks = scores.shape[0]
    mask = torch.eye(num_blocks, dtype=torch.bool, device=q.device)
    for query_block in range(num_blocks):
        row = scores[query_block, :query_block].nan_to_num(float("-inf"), float("-inf"), float("-inf"))
        best = torch.topk(row, min(blocks - 1, query_block)).indices  # the diagonal takes one place
        mask[query_block, best[row[best] > float("-inf")]] = True
    bad = _blocks.nonfinite_key_blocks(k, block)[None, :]
    return (mask | bad) & _blocks.causal_blocks(num_blocks, q.device)


def block_scores(q: torch.Tensor, k: torch.Tensor, scale: float | None, block: int,
                 pooled_k: torch.Tensor | None = None) -> torch.Tensor:
    """[B, Hq, nb, nb] float32: ``scale * mean_q . mean_k`` of every (query block, key block), q [B, Hq, N, D] and
    k [B, Hkv, N, D] read in place for GQA; no mask (the selection applies causality and finiteness).
    ``pooled_k``: k's block means where the caller has them. ``scale`` None leaves the products unscaled for a
    selection that applies it as it reads them (at 128k, 32 heads: a pass over 512 MiB saved)."""
    group = q.shape[1] // k.shape[1]
    pooled_q = _blocks.block_means(q, block).unflatten(1, (k.shape[1], group))
    pooled_k = _blocks.block_means(k, block) if pooled_k is None else pooled_k
    products = (pooled_q @ pooled_k[:, :, None].transpose(-1, -2)).flatten(1, 2)
    return products if scale is None else products * scale


def _best_earlier_blocks(scores: torch.Tensor, blocks: int) -> torch.return_types.topk:
    """The ``blocks - 1`` best-scoring key blocks before each query block of ``scores`` ([B, Hq, nb, blocks - 1]
    values and indices, unsorted; a value of -inf marks a place with no finite earlier block to fill it)."""
    num_blocks = scores.shape[-1]
    earlier = torch.ones(num_blocks, num_blocks, dtype=torch.bool, device=scores.device).tril(-1)
    scores = scores.nan_to_num(float("-inf"), float("-inf"), float("-inf")).masked_fill(~earlier, float("-inf"))
    return torch.topk(scores, min(max(blocks - 1, 0), num_blocks), dim=-1, sorted=False)


def block_topk_masks(q: torch.Tensor, k: torch.Tensor, scale: float, blocks: int, block: int) -> torch.Tensor:
    """[B, Hq, nb, nb] bool: :func:`block_topk_mask_reference` for every query head at once
    (q [B, Hq, N, D], k [B, Hkv, N, D] read in place for GQA); no host sync."""
    group = q.shape[1] // k.shape[1]
    num_blocks = -(-q.shape[2] // block)
    best = _best_earlier_blocks(block_scores(q, k, scale, block), blocks)
    kept = torch.zeros(*best.values.shape[:-1], num_blocks, dtype=torch.bool, device=q.device)
    kept.scatter_(-1, best.indices, best.values > float("-inf"))
    bad = _blocks.nonfinite_key_blocks(k, block).repeat_interleave(group, dim=1)[:, :, None, :]
    diagonal = torch.eye(num_blocks, dtype=torch.bool, device=q.device)
    return (kept | diagonal | bad) & _blocks.causal_blocks(num_blocks, q.device)


def block_topk_lists(q: torch.Tensor, k: torch.Tensor, scale: float, blocks: int, block: int,
                     pooled_k: torch.Tensor | None = None) -> torch.Tensor:
    """[B, Hq, nb, min(blocks, nb + 1)] int64: each query block's kept key blocks ascending, then ``nb`` in
    every empty place (:func:`_blocks.list_plan`'s input). Equal to :func:`block_topk_masks` where no key
    block holds a NaN or infinite key (those blocks are kept on every causal row, which a list of at most
    ``blocks`` places cannot hold: the identifier takes the mask there). On CUDA one Triton kernel selects
    (patterns/top_blocks.py; ties go to the earlier blocks); elsewhere ``torch.topk`` and a sort."""
    keep = max(blocks - 1, 0)
    if not top_block_problems(q):
        return top_block_lists(block_scores(q, k, None, block, pooled_k), keep, scale)
    return _top_block_lists_torch(block_scores(q, k, scale, block, pooled_k), keep)


def _top_block_lists_torch(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """:func:`~sparse_prefill.patterns.top_blocks.top_block_lists` in PyTorch (the kernel's reference)."""
    num_blocks = scores.shape[-1]
    best = _best_earlier_blocks(scores, keep + 1)
    found = torch.where(best.values > float("-inf"), best.indices, num_blocks)
    own = torch.arange(num_blocks, device=scores.device).expand(*found.shape[:-1])[..., None]
    return torch.cat([found, own], dim=-1).sort(dim=-1).values


class BlockTopkIdentifier(Identifier):
    """Pooled block scores of every query head at once, the top ``blocks`` listed per query head."""

    def __init__(self, blocks: int, block: int, dense_above: float) -> None:
        self.blocks, self.block, self.dense_above = blocks, block, dense_above

    def identify(self, q: torch.Tensor, k: torch.Tensor, ctx: AttentionContext) -> BlockPlan | DensePlan | PendingPlan:
        validate_attention_inputs(q, k, k)  # identification reads no v
        with torch.no_grad():
            pooled_k = _blocks.block_means(k, self.block)
            lists = block_topk_lists(q, k, ctx.scale, self.blocks, self.block, pooled_k)
            # A NaN or infinite key block is kept on every row (a mask, and a second host sync): found in the
            # lists' own sync, so finite inputs pay nothing for it. Such a key makes its block's float32 mean
            # non-finite (so does a sum of finite keys past float32's range: then the exact mask route too).
            bad = ~torch.isfinite(pooled_k).all()
            plan = _blocks.list_plan(lists, q.shape[2], self.block, k.shape[1], ctx, self.dense_above, unless=bad)
            if plan is None:
                mask = block_topk_masks(q, k, ctx.scale, self.blocks, self.block)
                plan = _blocks.block_plan(mask, q.shape[2], self.block, k.shape[1], ctx, self.dense_above)
        return plan


BLOCK_TOPK = PatternSpec(
    name="block-topk",
    description="MInference block-sparse: the top key blocks by pooled q . k per query block (baseline)",
    parameters={
        "blocks": Parameter(int, 100, "key blocks each query block keeps, its diagonal block included", at_least(1)),
        "block": Parameter(int, 64, "rows of a query block and keys of a key block (multiple of 16)", multiple_of(16)),
        "dense_above": Parameter(float, 0.4, "plans denser than this run as dense attention (faster there, and exact)",
                                 density),
    },
    make_identifier=BlockTopkIdentifier,
)
