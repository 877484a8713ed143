"""The specification of `vertical-slash`: its plan built one plan head at a time, plainly.

Slow on purpose (a Python loop over batch and plan heads, host syncs for the data-dependent sizes):
:class:`~sparse_prefill.patterns.vertical_slash.VerticalSlashIdentifier` computes every head at once
and is tested against :func:`vertical_slash_plan_reference` for equal plans. Its memory is the
``last_q x N`` score block of one head and lists proportional to what is selected.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparse_prefill.patterns._lines import largest, line_scores
from sparse_prefill.plan import StripePlan

__all__ = ["vertical_slash_plan_reference"]


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
    columns = sink + largest(vertical[sink:], count_vertical)
    offsets = (local + 1 + largest(slash[local + 1:], count_slash)).sort(descending=True).values
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


def _head_lines(q: torch.Tensor, k: torch.Tensor, plan_head: int, group: int, scale: float, vertical: int,
                slash: int, last_q: int, block: int, sink: int, local: int, share_kv_heads: bool) -> _Lines:
    """One plan head's selection; q [Hq, N, D] and k [Hkv, N, D] of one sequence."""
    seq_len = q.shape[1]
    rows = min(last_q, seq_len)
    query_heads = range(plan_head * group, (plan_head + 1) * group) if share_kv_heads else [plan_head]
    scores = [line_scores(q[h, -rows:], k[h // group], scale) for h in query_heads]
    # Summed over the group's query heads in head order, as the vectorised identifier sums them.
    head_vertical = torch.stack([s[0] for s in scores]).sum(dim=0)
    head_slash = torch.stack([s[1] for s in scores]).sum(dim=0)
    return _select(head_vertical, head_slash, vertical, slash, sink, local, block)


def vertical_slash_plan_reference(q: torch.Tensor, k: torch.Tensor, scale: float, vertical: int, slash: int,
                                  last_q: int, block: int, sink: int, local: int,
                                  share_kv_heads: bool) -> StripePlan:
    """The StripePlan `vertical-slash` lists for q [B, Hq, N, D] and k [B, Hkv, N, D] (no dense
    fallback, no budget), one plan head at a time."""
    batch, num_q, seq_len, _ = q.shape
    group = num_q // k.shape[1]
    plan_heads = k.shape[1] if share_kv_heads else num_q
    plan = StripePlan.empty(batch, plan_heads, seq_len, block, sink, local, q.device)
    lines = [[_head_lines(q[b], k[b], h, group, scale, vertical, slash, last_q, block, sink, local, share_kv_heads)
              for h in range(plan_heads)] for b in range(batch)]
    counts = torch.stack([torch.stack([_group_entries(head, plan)[3] for head in row]) for row in lines])
    return plan.filled(counts, torch.cat([_group_keys(head, plan) for row in lines for head in row]))
