"""The specification of `flexprefill`: one query head's block mask, plainly.

Slow on purpose (host syncs for the budgets; the identifier called it once per head):
:func:`~sparse_prefill.patterns.flexprefill.flexprefill_block_masks` computes every head at once and
is tested against :func:`flexprefill_block_mask_reference` for equal masks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sparse_prefill.patterns._blocks import block_means
from sparse_prefill.patterns._lines import largest, line_scores

__all__ = ["covering_count", "flexprefill_block_mask_reference"]


def covering_count(mass: torch.Tensor, gamma: float) -> int:
    """How many of the largest entries of ``mass`` (summing to about 1) it takes to cover ``gamma``
    of it, counted as FlexPrefill does: the entries whose running sum stays within gamma, plus one."""
    running = mass.sort(descending=True).values.cumsum(0)
    return int((running <= gamma).sum()) + 1


def _block_sums(values: torch.Tensor, block: int) -> torch.Tensor:
    """Sums of consecutive ``block`` entries of a 1-D tensor (the last block may be shorter)."""
    return F.pad(values, (0, -values.numel() % block)).view(-1, block).sum(dim=1)


def _js_distance(p: torch.Tensor, q: torch.Tensor) -> float:
    """Square root of the Jensen-Shannon divergence of two distributions (natural log)."""
    m = (p + q) / 2

    def relative_entropy(x: torch.Tensor) -> torch.Tensor:  # KL(x || m), with 0 log 0 = 0
        return torch.where(x > 0, x * (x / m).log(), torch.zeros_like(x)).sum()

    return float((0.5 * relative_entropy(p) + 0.5 * relative_entropy(q)).clamp_min(0).sqrt())


def flexprefill_block_mask_reference(q: torch.Tensor, k: torch.Tensor, scale: float, gamma: float, tau: float,
                                     block: int, min_budget: int) -> torch.Tensor:
    """[nb, nb] bool: which key blocks each query block attends, for one query head (q [N, D]) and
    its key head (k [N, D]); block-causal, the diagonal included."""
    seq_len = q.shape[0]
    num_blocks = -(-seq_len // block)
    rows = min(block, seq_len)
    vertical, slash = line_scores(q[-rows:], k, scale)
    vertical, slash = vertical / rows, slash / rows  # each sums to 1
    min_blocks = -(-min_budget // block)
    vertical_blocks = min(max(covering_count(vertical, gamma) // block + 1, min_blocks), num_blocks)
    slash_blocks = min(max(covering_count(slash, gamma) // block + 1, min_blocks), num_blocks)
    vertical, slash = _block_sums(vertical, block), _block_sums(slash, block)

    key_means = block_means(k, block)
    estimate = torch.softmax((q[-rows:].float().mean(dim=0) * key_means).sum(dim=-1) * scale, dim=-1)
    query_aware = _js_distance(estimate, vertical) < tau
    if query_aware:
        vertical_blocks = slash_blocks = min(min_blocks, num_blocks)

    vertical[0] = float("inf")  # the first key block and the nearest diagonal block, always
    slash[0] = float("inf")
    kept_columns = largest(vertical, vertical_blocks)
    kept_offsets = largest(slash, slash_blocks)
    query_block = torch.arange(num_blocks, device=q.device)[:, None]
    mask = torch.zeros(num_blocks, num_blocks, dtype=torch.bool, device=q.device)
    mask[:, kept_columns] = True
    diagonal_keys = query_block - kept_offsets[None, :]
    valid = diagonal_keys >= 0
    mask[query_block.expand_as(diagonal_keys)[valid], diagonal_keys[valid]] = True
    if query_aware:
        scores = (block_means(q, block) @ key_means.T) * scale
        causal = query_block >= torch.arange(num_blocks, device=q.device)[None, :]
        pooled = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1).flatten()
        mass, order = pooled.sort(descending=True, stable=True)
        mask.view(-1)[order[mass.cumsum(0) <= gamma * num_blocks]] = True
    return mask & (query_block >= torch.arange(num_blocks, device=q.device)[None, :])
