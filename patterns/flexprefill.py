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

Expressed as a :class:`~sparse_prefill.plan.BlockPlan` (one list of key blocks per query head and
query block), what FlexPrefill's block kernel computes. Listing every key of the kept blocks as a
StripePlan, as this pattern first did, made the lists 128 times larger: at Qwen2.5-Coder-0.5B's 32k shape
26-88 MB against a plan budget of 15 MB, so a layer was identified whole, refused, and identified again
per chunk of heads (that prefill took 2.2-2.6x dense's time then; as BlockPlans 1.13x on an H100,
docs/benchmarks/whole_model.md).

Decided here: diagonal blocks are offset ranges ``[s * block, (s + 1) * block)`` (the published
code pools diagonals from the far end, which shifts them when the length is not a multiple of the
block); partial last blocks are averaged over their real rows; equal scores rank the lower block
first (a stable sort, the same on every device); a plan denser than ``dense_above`` runs as dense
attention.

:func:`~sparse_prefill.patterns.flexprefill_reference.flexprefill_block_mask_reference` is the
specification (one head); :func:`flexprefill_block_masks` computes the same masks for every head
at once in plain PyTorch on any device, and the identifier lists them with one host sync (after the plan's
executor is launched where the caller defers sizing, docs/architecture.md). Memory:
the ``block x N`` scores of a chunk of heads and (N / block)^2 pooled scores per head, transient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sparse_prefill.interfaces import AttentionContext, Identifier, Parameter, PatternSpec
from sparse_prefill.patterns._blocks import block_means, block_plan, causal_blocks
from sparse_prefill.patterns._checks import allowing, at_least, density, fraction, multiple_of
from sparse_prefill.patterns._lines import all_line_scores
from sparse_prefill.patterns.flexprefill_reference import covering_count, flexprefill_block_mask_reference
from sparse_prefill.plan import BlockPlan, DensePlan, PendingPlan
from sparse_prefill.validation import validate_attention_inputs

__all__ = ["FLEXPREFILL", "FlexPrefillIdentifier", "covering_count", "flexprefill_block_mask_reference",
           "flexprefill_block_masks"]


@allowing("in [0, 1]")
def _closed_unit(value: float) -> str | None:
    return None if 0 <= value <= 1 else "must be in [0, 1] (0: no head is query-aware; 1: every head is)"


def _ranked_first(values: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """bool like ``values``: the ``counts[...]`` largest along the last dim, ties to the lower index."""
    order = values.sort(dim=-1, descending=True, stable=True).indices
    ranks = torch.arange(values.shape[-1], device=values.device)
    return torch.zeros_like(values, dtype=torch.bool).scatter_(-1, order, (ranks < counts[..., None]).expand_as(order))


def _js_distances(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Square root of the Jensen-Shannon divergence of distributions along the last dim (natural log)."""
    m = (p + q) / 2

    def relative_entropy(x: torch.Tensor) -> torch.Tensor:  # KL(x || m), with 0 log 0 = 0
        return torch.where(x > 0, x * (x / m).log(), torch.zeros_like(x)).sum(dim=-1)

    return (0.5 * relative_entropy(p) + 0.5 * relative_entropy(q)).clamp_min(0).sqrt()


def flexprefill_block_masks(q: torch.Tensor, k: torch.Tensor, scale: float, gamma: float, tau: float, block: int,
                            min_budget: int) -> torch.Tensor:
    """[B, Hq, nb, nb] bool: :func:`flexprefill_block_mask_reference` for every query head at once
    (q [B, Hq, N, D], k [B, Hkv, N, D] read in place for GQA); no host sync."""
    batch, num_q, seq_len, _ = q.shape
    num_kv = k.shape[1]
    num_blocks = -(-seq_len // block)
    rows = min(block, seq_len)
    vertical, slash = (x / rows for x in all_line_scores(q, k, scale, rows))  # each sums to 1
    min_blocks = -(-min_budget // block)

    def budget(mass: torch.Tensor) -> torch.Tensor:  # covering_count // block + 1, within [min_blocks, nb]
        covering = (mass.sort(dim=-1, descending=True).values.cumsum(dim=-1) <= gamma).sum(dim=-1) + 1
        return (covering // block + 1).clamp(min=min_blocks).clamp(max=num_blocks)

    vertical_blocks, slash_blocks = budget(vertical), budget(slash)
    vertical, slash = (F.pad(x, (0, -seq_len % block)).unflatten(-1, (-1, block)).sum(dim=-1)
                       for x in (vertical, slash))

    key_means = block_means(k, block)[:, :, None]  # [B, Hkv, 1, nb, D]
    last_mean = q[:, :, seq_len - rows:].float().mean(dim=-2).unflatten(1, (num_kv, -1))  # [B, Hkv, g, D]
    estimate = torch.softmax((last_mean[..., None, :] * key_means).sum(dim=-1) * scale, dim=-1).flatten(1, 2)
    query_aware = _js_distances(estimate, vertical).double() < tau  # [B, Hq]; tau compared as a Python float
    vertical_blocks = torch.where(query_aware, min(min_blocks, num_blocks), vertical_blocks)
    slash_blocks = torch.where(query_aware, min(min_blocks, num_blocks), slash_blocks)

    vertical[..., 0] = float("inf")  # the first key block and the nearest diagonal block, always
    slash[..., 0] = float("inf")
    kept_columns = _ranked_first(vertical, vertical_blocks)
    kept_offsets = _ranked_first(slash, slash_blocks)
    blocks = torch.arange(num_blocks, device=q.device)
    causal = causal_blocks(num_blocks, q.device)
    offset = (blocks[:, None] - blocks[None, :]).clamp_min(0)  # query block I, key block J: diagonal I - J
    mask = kept_columns[..., None, :] | (kept_offsets[..., offset.flatten()].view(batch, num_q, num_blocks,
                                                                                  num_blocks) & causal)

    scores = (block_means(q, block).unflatten(1, (num_kv, -1)) @ key_means.transpose(-1, -2)) * scale
    pooled = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1).flatten(1, 2).flatten(-2)
    mass, order = pooled.sort(dim=-1, descending=True, stable=True)
    covered = torch.zeros_like(pooled, dtype=torch.bool).scatter_(-1, order, mass.cumsum(dim=-1) <= gamma * num_blocks)
    mask |= covered.view_as(mask) & query_aware[..., None, None]
    return mask & causal


class FlexPrefillIdentifier(Identifier):
    """Block masks of every query head at once (KV heads read in place), listed as key blocks."""

    def __init__(self, gamma: float, tau: float, block: int, min_budget: int, dense_above: float) -> None:
        self.gamma, self.tau, self.block, self.min_budget, self.dense_above = gamma, tau, block, min_budget, dense_above

    def identify(self, q: torch.Tensor, k: torch.Tensor, ctx: AttentionContext) -> BlockPlan | DensePlan | PendingPlan:
        validate_attention_inputs(q, k, k)  # identification reads no v
        with torch.no_grad():
            mask = flexprefill_block_masks(q, k, ctx.scale, self.gamma, self.tau, self.block, self.min_budget)
            return block_plan(mask, q.shape[2], self.block, k.shape[1], ctx, self.dense_above)


FLEXPREFILL = PatternSpec(
    name="flexprefill",
    description="FlexPrefill: per-head vertical-slash or query-aware key blocks covering gamma (baseline)",
    parameters={
        "gamma": Parameter(float, 0.9, "attention mass the selected lines or blocks must cover", fraction),
        "tau": Parameter(float, 0.1, "a head is query-aware when its pooled estimate is this close (sqrt JS)",
                         _closed_unit),
        "block": Parameter(int, 128, "rows of a query block and keys of a key block (multiple of 16)", multiple_of(16)),
        "min_budget": Parameter(int, 1024, "fewest keys of vertical and of diagonal blocks per head", at_least(0)),
        "dense_above": Parameter(float, 0.4, "plans denser than this run as dense attention (faster there, and exact)",
                                 density),
    },
    make_identifier=FlexPrefillIdentifier,
)
