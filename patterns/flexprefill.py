"""`flexprefill`: FlexPrefill's context-aware block selection (arXiv 2502.20766), a baseline beside `anchor`.

Per query head, the last ``block`` queries score every key (softmax in float32), and two budgets
follow from their attention:

* **Vertical-slash heads**: as many key columns and as many diagonals as cover ``gamma`` of the
  last queries' attention, counted in tokens, turned into that many ``block``-wide blocks (plus
  one), at least ``min_budget`` tokens' worth; the top key blocks by column mass and the top
  diagonal blocks by diagonal mass are kept, the first key block and the nearest diagonal block
  always.
* **Query-aware heads**, where the pooled estimate (the last queries' mean against each key
  block's mean key) is within ``tau`` of their block attention (square-root Jensen-Shannon
  divergence): the vertical and diagonal budgets drop to ``min_budget``, and every query block
  adds the key blocks of the pooled attention (block means of q and k, softmax per query block)
  that together cover ``gamma`` of all query blocks' mass, largest first.

Expressed as a :class:`~sparse_prefill.plan.StripePlan` with one group per query block, no
initial window and no local one beyond the group's own causal diagonal block: each group lists
every key of its selected off-diagonal blocks. Block granularity is kept, so the density is what
FlexPrefill's block kernel computes.

Decided here: diagonal blocks are offset ranges ``[s * block, (s + 1) * block)`` (the published
code pools diagonals from the far end, which shifts them when the length is not a multiple of the
block); partial last blocks are averaged over their real rows; a plan denser than
``dense_above`` runs as dense attention. Plain PyTorch on any device, one head at a time (a
Python loop, with host syncs for the budgets): a baseline for comparisons, far slower than
`anchor`'s Triton identifier. The block-level pooled attention of a query-aware head is
(N / block)^2 floats, transient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sparse_prefill.interfaces import AttentionContext, Identifier, Parameter, PatternSpec
from sparse_prefill.patterns._budget import check_plan_budget
from sparse_prefill.patterns._checks import allowing, at_least, density, multiple_of
from sparse_prefill.patterns.vertical_slash import line_scores
from sparse_prefill.plan import DensePlan, StripePlan
from sparse_prefill.validation import validate_attention_inputs

__all__ = ["FLEXPREFILL", "FlexPrefillIdentifier", "covering_count", "block_mask"]


@allowing("in (0, 1]")
def _fraction(value: float) -> str | None:
    return None if 0 < value <= 1 else "must be in (0, 1]"


@allowing("in [0, 1]")
def _closed_unit(value: float) -> str | None:
    return None if 0 <= value <= 1 else "must be in [0, 1] (0: no head is query-aware; 1: every head is)"


def covering_count(mass: torch.Tensor, gamma: float) -> int:
    """How many of the largest entries of ``mass`` (summing to about 1) it takes to cover ``gamma``
    of it, counted as FlexPrefill does: the entries whose running sum stays within gamma, plus one."""
    running = mass.sort(descending=True).values.cumsum(0)
    return int((running <= gamma).sum()) + 1


def _block_sums(values: torch.Tensor, block: int) -> torch.Tensor:
    """Sums of consecutive ``block`` entries of a 1-D tensor (the last block may be shorter)."""
    return F.pad(values, (0, -values.numel() % block)).view(-1, block).sum(dim=1)


def _block_means(rows: torch.Tensor, block: int) -> torch.Tensor:
    """Means of consecutive ``block`` rows of [N, D] over the rows that exist."""
    sums = F.pad(rows.float(), (0, 0, 0, -rows.shape[0] % block)).view(-1, block, rows.shape[1]).sum(dim=1)
    counts = _block_sums(torch.ones(rows.shape[0], device=rows.device), block)
    return sums / counts[:, None]


def _js_distance(p: torch.Tensor, q: torch.Tensor) -> float:
    """Square root of the Jensen-Shannon divergence of two distributions (natural log)."""
    m = (p + q) / 2

    def relative_entropy(x: torch.Tensor) -> torch.Tensor:  # KL(x || m), with 0 log 0 = 0
        return torch.where(x > 0, x * (x / m).log(), torch.zeros_like(x)).sum()

    return float((0.5 * relative_entropy(p) + 0.5 * relative_entropy(q)).clamp_min(0).sqrt())


def block_mask(q: torch.Tensor, k: torch.Tensor, scale: float, gamma: float, tau: float, block: int,
               min_budget: int) -> torch.Tensor:
    """[nb, nb] bool: which key blocks each query block attends, for one query head (q [N, D]) and
    its key head (k [N, D]); block-causal, the diagonal included."""
    seq_len = q.shape[0]
    num_blocks = -(-seq_len // block)
    rows = min(block, seq_len)
    positions = torch.arange(seq_len - rows, seq_len, device=q.device)
    vertical, slash = line_scores(q[-rows:], k, positions, scale)
    vertical, slash = vertical / rows, slash / rows  # each sums to 1
    min_blocks = -(-min_budget // block)
    vertical_blocks = min(max(covering_count(vertical, gamma) // block + 1, min_blocks), num_blocks)
    slash_blocks = min(max(covering_count(slash, gamma) // block + 1, min_blocks), num_blocks)
    vertical, slash = _block_sums(vertical, block), _block_sums(slash, block)

    key_means = _block_means(k, block)
    estimate = torch.softmax(q[-rows:].float().mean(dim=0) @ key_means.T * scale, dim=-1)
    query_aware = _js_distance(estimate, vertical) < tau
    if query_aware:
        vertical_blocks = slash_blocks = min(min_blocks, num_blocks)

    vertical[0] = float("inf")  # the first key block and the nearest diagonal block, always
    slash[0] = float("inf")
    kept_columns = torch.topk(vertical, vertical_blocks).indices
    kept_offsets = torch.topk(slash, slash_blocks).indices
    query_block = torch.arange(num_blocks, device=q.device)[:, None]
    mask = torch.zeros(num_blocks, num_blocks, dtype=torch.bool, device=q.device)
    mask[:, kept_columns] = True
    diagonal_keys = query_block - kept_offsets[None, :]
    valid = diagonal_keys >= 0
    mask[query_block.expand_as(diagonal_keys)[valid], diagonal_keys[valid]] = True
    if query_aware:
        scores = (_block_means(q, block) @ key_means.T) * scale
        causal = query_block >= torch.arange(num_blocks, device=q.device)[None, :]
        pooled = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1).flatten()
        mass, order = pooled.sort(descending=True)
        mask.view(-1)[order[mass.cumsum(0) <= gamma * num_blocks]] = True
    return mask & (query_block >= torch.arange(num_blocks, device=q.device)[None, :])


class FlexPrefillIdentifier(Identifier):
    """One block mask per query head (its KV head read in place), listed as whole key blocks."""

    def __init__(self, gamma: float, tau: float, block: int, min_budget: int, dense_above: float) -> None:
        self.gamma, self.tau, self.block, self.min_budget, self.dense_above = gamma, tau, block, min_budget, dense_above

    def identify(self, q: torch.Tensor, k: torch.Tensor, ctx: AttentionContext) -> StripePlan | DensePlan:
        validate_attention_inputs(q, k, k)  # identification reads no v
        batch, num_q, seq_len, _ = q.shape
        group = num_q // k.shape[1]
        plan = StripePlan.empty(batch, num_q, seq_len, self.block, 0, 0, q.device)
        # Off-diagonal (query block, key block) pairs per head; the diagonal block is the local window.
        pairs = [torch.nonzero(block_mask(q[b, h], k[b, h // group], ctx.scale, self.gamma, self.tau, self.block,
                                          self.min_budget).tril(-1))
                 for b in range(batch) for h in range(num_q)]
        counts = torch.stack([torch.bincount(p[:, 0], minlength=plan.num_groups) for p in pairs]) * self.block
        if ctx.dense_fallback and plan.density_with(counts.sum(dim=0)) > self.dense_above:
            return DensePlan(batch, num_q, seq_len)
        check_plan_budget(counts.view(batch, num_q, -1), k.shape[1], ctx, per_query_head=True)
        within = torch.arange(self.block, device=q.device)
        return plan.filled(counts, torch.cat([(p[:, 1:] * self.block + within).flatten() for p in pairs]))


FLEXPREFILL = PatternSpec(
    name="flexprefill",
    description="FlexPrefill: per-head vertical-slash or query-aware key blocks covering gamma (baseline)",
    parameters={
        "gamma": Parameter(float, 0.9, "attention mass the selected lines or blocks must cover", _fraction),
        "tau": Parameter(float, 0.1, "a head is query-aware when its pooled estimate is this close (sqrt JS)",
                         _closed_unit),
        "block": Parameter(int, 128, "rows of a query block and keys of a key block (multiple of 16)", multiple_of(16)),
        "min_budget": Parameter(int, 1024, "fewest keys of vertical and of diagonal blocks per head", at_least(0)),
        "dense_above": Parameter(float, 0.4, "plans denser than this run as dense attention (faster there, and exact)",
                                 density),
    },
    make_identifier=FlexPrefillIdentifier,
)
