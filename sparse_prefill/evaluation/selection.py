"""What a plan selects for one head, beside where that head's attention mass lies.

The picture that explains stripes vs blocks: for one query head of a real prompt, a grid of
``cell x cell`` tiles holding (a) the mean attention mass the tile's rows give its keys, and
(b) the fraction of the tile's causal (row, key) pairs the plan computes. Computed ``cell``
rows at a time, so memory is O(cell * N), never N x N.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sparse_prefill.evaluation.recall import causal_probabilities, plan_rows_mask
from sparse_prefill.plan import BlockPlan, DensePlan, StripePlan

__all__ = ["SelectionGrid", "selection_grid", "plan_rows_mask"]


@dataclass
class SelectionGrid:
    """``mass[i, j]``: mean over the rows of row tile i of the attention they give key tile j (rows sum
    to 1); ``selected[i, j]``: fraction of tile (i, j)'s causal pairs in the plan (NaN above the
    diagonal); ``recall``: mean over rows of the attention mass on selected keys; ``density``: the
    fraction of all causal pairs the plan computes for this head."""

    mass: torch.Tensor
    selected: torch.Tensor
    recall: float
    density: float
    cell: int
    head: int


def selection_grid(q: torch.Tensor, k: torch.Tensor, plan: StripePlan | BlockPlan | DensePlan, *, head: int,
                   scale: float | None = None, cell: int = 64, batch: int = 0) -> SelectionGrid:
    """The grid for query ``head`` of batch element ``batch``; q [B, Hq, N, D], k [B, Hkv, N, D] (post-RoPE,
    for example from :func:`~sparse_prefill.evaluation.recall.capture_qk`). Exact fp32 softmax."""
    num_q, n = q.shape[1], q.shape[2]
    if not 0 <= head < num_q:
        raise ValueError(f"head must be in [0, {num_q}), got {head}")
    if cell <= 0:
        raise ValueError(f"cell must be positive, got {cell}")
    if plan.seq_len != n:
        raise ValueError(f"plan.seq_len {plan.seq_len} != the inputs' {n}")
    plan_heads = plan.plan_heads if isinstance(plan, StripePlan) else plan.heads
    plan_head = head // (num_q // plan_heads)
    kv_head = head // (num_q // k.shape[1])
    query, keys = q[batch, head : head + 1], k[batch, kv_head : kv_head + 1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    tiles = math.ceil(n / cell)
    mass = torch.zeros(tiles, tiles)
    selected = torch.full((tiles, tiles), float("nan"))
    kept, computed = 0.0, 0
    key_tile = torch.arange(n) // cell
    for i in range(tiles):
        start, end = i * cell, min((i + 1) * cell, n)
        probs = causal_probabilities(query, keys, start, end, scale)[0, 0]  # [rows, keys before end]
        causal = torch.arange(end).unsqueeze(0) <= torch.arange(start, end).unsqueeze(1)
        mask = plan_rows_mask(plan, batch, plan_head, start, end)[:, :end]
        tile = key_tile[:end]
        kept += float((probs * mask).sum())
        mass[i].index_add_(0, tile, probs.sum(0) / (end - start))
        pairs = torch.zeros(tiles).index_add_(0, tile, causal.sum(0).float())
        hits = torch.zeros(tiles).index_add_(0, tile, (mask & causal).sum(0).float())
        selected[i, : i + 1] = hits[: i + 1] / pairs[: i + 1]
        computed += int(hits.sum())
    return SelectionGrid(mass=mass, selected=selected, recall=kept / n, density=computed / (n * (n + 1) // 2),
                         cell=cell, head=head)
