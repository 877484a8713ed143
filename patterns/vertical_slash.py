"""`vertical-slash`: MInference's vertical-slash pattern (arXiv 2407.02490), a baseline beside `anchor`.

The last ``last_q`` queries of a head score every key (softmax in float32). Their probabilities
summed per key column rank the *vertical* lines, summed per diagonal (``row - key``) the *slash*
lines; the head keeps its top ``vertical`` columns and top ``slash`` diagonals for every query.

Expressed as a :class:`~sparse_prefill.plan.StripePlan`, so the Triton stripe executor runs it on
the GPU: the first ``sink`` keys and the ``local`` keys before each query group are windows
(MInference forces its first 30 columns and nearest 100 diagonals the same way), and each group
of ``block`` rows lists the selected columns plus every key its rows reach along a selected
diagonal (a diagonal crosses ``block`` keys per group, as in MInference's block kernel).

Decided where the published method leaves room, or differs here on purpose:

* The windows do not count within ``vertical`` and ``slash``: those lines are chosen outside them.
* K is read in place for GQA. With ``share_kv_heads`` the query heads of one KV group add their
  scores and share one list (the published code scores every query head alone: the default).
* Diagonals whose key ranges touch within a group are merged first; the last, shorter group of
  a sequence keeps the merged ranges whole (a few keys more than its rows reach).
* A plan denser than ``dense_above`` runs as dense attention, as `anchor`'s does.

This identifier is plain PyTorch on any device, one head at a time (a Python loop, with host
syncs for the data-dependent sizes): a baseline for comparisons, far slower than `anchor`'s Triton
identifier. Its memory is the ``last_q x N`` score block of one head and lists proportional to
what is selected.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparse_prefill.interfaces import AttentionContext, Identifier, Parameter, PatternSpec
from sparse_prefill.patterns._budget import check_plan_budget
from sparse_prefill.patterns._checks import at_least, density, multiple_of
from sparse_prefill.plan import DensePlan, StripePlan
from sparse_prefill.validation import validate_attention_inputs

__all__ = ["VERTICAL_SLASH", "VerticalSlashIdentifier", "line_scores"]


def line_scores(q_last: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, scale: float,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(vertical [N], slash [N]) scores of one head: the last queries' attention summed per key
    column and per diagonal ``offset = row - key``.

    q_last [L, D] are the queries at ``positions`` [L] (the last rows); k [N, D].
    """
    seq_len = k.shape[0]
    keys = torch.arange(seq_len, device=k.device)
    scores = (q_last.float() @ k.float().T) * scale
    scores.masked_fill_(keys[None, :] > positions[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    vertical = probs.sum(dim=0)
    # Masked entries have probability 0, so clamping their (negative) offsets to 0 adds nothing.
    offsets = (positions[:, None] - keys[None, :]).clamp_min(0)
    slash = torch.zeros(seq_len, dtype=torch.float32, device=k.device)
    slash.scatter_add_(0, offsets.flatten(), probs.flatten())
    return vertical, slash


@dataclass(frozen=True)
class _Lines:
    """One plan head's selection: key columns (ascending) and runs of merged diagonals."""

    columns: torch.Tensor  # int64 [V], ascending, all >= sink
    run_first: torch.Tensor  # int64 [I], each run's largest offset, descending across runs
    run_last: torch.Tensor  # int64 [I], each run's smallest offset


def _select(vertical: torch.Tensor, slash: torch.Tensor, count_vertical: int, count_slash: int, sink: int,
            local: int, group_rows: int) -> _Lines:
    """Top columns outside the initial window and top diagonals outside the local one, the diagonals
    merged into runs whose key ranges touch within a group (consecutive offsets <= group_rows apart)."""
    seq_len = vertical.numel()
    count_vertical = max(0, min(count_vertical, seq_len - sink))
    count_slash = max(0, min(count_slash, seq_len - local - 1))
    columns = sink + torch.topk(vertical[sink:], count_vertical).indices
    offsets = (local + 1 + torch.topk(slash[local + 1:], count_slash).indices).sort(descending=True).values
    if not count_slash:
        return _Lines(columns.sort().values, offsets, offsets)
    breaks = torch.nonzero(offsets[:-1] - offsets[1:] > group_rows).flatten()
    first = torch.cat([breaks.new_zeros(1), breaks + 1])
    last = torch.cat([breaks, breaks.new_full((1,), count_slash - 1)])
    return _Lines(columns.sort().values, offsets[first], offsets[last])


def _group_entries(lines: _Lines, plan: StripePlan) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per group: the clipped diagonal runs (start [G, I], length [G, I]) and the columns kept (mask [G, V]),
    and the number of keys each group selects [G]. Windows and lists never overlap."""
    row_start, row_end, sink_end, local_start = (x[:, None] for x in plan.group_geometry(lines.columns.device))
    # Run i covers keys [row_start - first_i, row_end - 1 - last_i] of the group's rows.
    run_start = row_start - lines.run_first[None, :]
    run_end = row_end - 1 - lines.run_last[None, :]
    start = torch.maximum(run_start, sink_end)
    length = (torch.minimum(run_end, local_start - 1) - start + 1).clamp_min(0)
    # A column is listed when it is a candidate and no run already lists it.
    columns = lines.columns[None, :]
    keep = (columns >= sink_end) & (columns < local_start) & ~_covered(columns, run_start, run_end)
    return start, length, keep, length.sum(dim=1) + keep.sum(dim=1)


def _covered(columns: torch.Tensor, run_start: torch.Tensor, run_end: torch.Tensor) -> torch.Tensor:
    """[G, V] whether a run's key range [run_start, run_end] (sorted, disjoint per group) holds the column."""
    if run_start.shape[1] == 0:
        return torch.zeros(run_start.shape[0], columns.shape[1], dtype=torch.bool, device=columns.device)
    columns = columns.expand(run_start.shape[0], -1).contiguous()
    run = torch.searchsorted(run_start.contiguous(), columns, right=True) - 1
    end = run_end.gather(1, run.clamp_min(0))
    return (run >= 0) & (columns <= end)


def _group_keys(lines: _Lines, plan: StripePlan) -> torch.Tensor:
    """The int32 key lists of one plan head's groups, concatenated in group order, each ascending."""
    start, length, keep, _ = _group_entries(lines, plan)
    groups = torch.arange(start.shape[0], device=start.device)
    # Diagonal runs: length[g, i] consecutive keys from start[g, i].
    flat_length = length.flatten()
    run_keys = torch.repeat_interleave(start.flatten(), flat_length)
    first_slot = torch.repeat_interleave(flat_length.cumsum(0) - flat_length, flat_length)
    run_keys = run_keys + torch.arange(run_keys.numel(), device=start.device) - first_slot
    run_groups = torch.repeat_interleave(groups.repeat_interleave(start.shape[1]), flat_length)
    column_groups, column = torch.nonzero(keep, as_tuple=True)
    keys = torch.cat([run_keys, lines.columns[column]])
    # Runs and kept columns are disjoint: one sort by (group, key) orders every list.
    order = torch.argsort(torch.cat([run_groups, column_groups]) * plan.seq_len + keys)
    return keys[order].to(torch.int32)


class VerticalSlashIdentifier(Identifier):
    """Scores lines from the last queries, then lists each group's keys; any device (plain PyTorch)."""

    def __init__(self, vertical: int, slash: int, last_q: int, block: int, sink: int, local: int,
                 share_kv_heads: bool, dense_above: float) -> None:
        self.vertical, self.slash, self.last_q, self.block = vertical, slash, last_q, block
        self.sink, self.local, self.share_kv_heads, self.dense_above = sink, local, share_kv_heads, dense_above

    def identify(self, q: torch.Tensor, k: torch.Tensor, ctx: AttentionContext) -> StripePlan | DensePlan:
        validate_attention_inputs(q, k, k)  # identification reads no v
        batch, num_q, seq_len, _ = q.shape
        num_kv = k.shape[1]
        group = num_q // num_kv
        plan_heads = num_kv if self.share_kv_heads else num_q
        plan = StripePlan.empty(batch, plan_heads, seq_len, self.block, self.sink, self.local, q.device)
        lines = [[self._lines(q[b], k[b], h, group, ctx.scale) for h in range(plan_heads)] for b in range(batch)]
        # Counted here and listed below from the same small selection: keeping every head's [groups, runs]
        # entries in between would hold them all at once, which at 128k is about 100 MB per head.
        counts = torch.stack([torch.stack([_group_entries(head, plan)[3] for head in row]) for row in lines])
        if ctx.dense_fallback and plan.density_with(counts.sum(dim=(0, 1))) > self.dense_above:
            return DensePlan(batch, num_q, seq_len)
        check_plan_budget(counts, num_kv, ctx, per_query_head=not self.share_kv_heads)
        return plan.filled(counts, torch.cat([_group_keys(head, plan) for row in lines for head in row]))

    def _lines(self, q: torch.Tensor, k: torch.Tensor, plan_head: int, group: int, scale: float) -> _Lines:
        """One plan head's selection; q [Hq, N, D] and k [Hkv, N, D] of one sequence."""
        seq_len = q.shape[1]
        rows = min(self.last_q, seq_len)
        positions = torch.arange(seq_len - rows, seq_len, device=q.device)
        query_heads = range(plan_head * group, (plan_head + 1) * group) if self.share_kv_heads else [plan_head]
        vertical = torch.zeros(seq_len, dtype=torch.float32, device=q.device)
        slash = torch.zeros_like(vertical)
        for h in query_heads:
            head_vertical, head_slash = line_scores(q[h, -rows:], k[h // group], positions, scale)
            vertical += head_vertical
            slash += head_slash
        return _select(vertical, slash, self.vertical, self.slash, self.sink, self.local, self.block)


VERTICAL_SLASH = PatternSpec(
    name="vertical-slash",
    description="MInference vertical-slash: top key columns and diagonals from the last queries (baseline)",
    parameters={
        "vertical": Parameter(int, 1000, "key columns kept per head, besides the initial window", at_least(0)),
        "slash": Parameter(int, 6096, "diagonals kept per head, besides the local window", at_least(0)),
        "last_q": Parameter(int, 64, "last queries whose attention ranks the lines", at_least(1)),
        "block": Parameter(int, 64, "query rows sharing one key list (multiple of 16)", multiple_of(16)),
        "sink": Parameter(int, 30, "initial keys every query attends", at_least(0)),
        "local": Parameter(int, 100, "keys before each query group attended densely (plus its own diagonal)",
                           at_least(0)),
        "share_kv_heads": Parameter(bool, False, "query heads of one KV group add their scores into one key list"),
        "dense_above": Parameter(float, 0.4, "plans denser than this run as dense attention (faster there, and exact)",
                                 density),
    },
    make_identifier=VerticalSlashIdentifier,
)
