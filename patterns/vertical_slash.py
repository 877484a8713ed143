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
* Equal scores rank the lower column or diagonal first (a stable sort, the same on every device).
* A plan denser than ``dense_above`` runs as dense attention, as `anchor`'s does.

:func:`~sparse_prefill.patterns.vertical_slash_reference.vertical_slash_plan_reference` is the
specification (one plan head at a time); :class:`VerticalSlashIdentifier` builds the same plan for
every head at once in plain PyTorch on any device, with one host sync to size it. Its memory: the
``last_q x N`` scores of a chunk of heads, [groups x (runs + columns)] entries for a chunk of plan
heads (both chunks bounded by ``_blocks.CHUNK_ELEMENTS``), and the plan itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from sparse_prefill.interfaces import AttentionContext, Identifier, Parameter, PatternSpec
from sparse_prefill.patterns import _blocks
from sparse_prefill.patterns._budget import enforce_plan_budget
from sparse_prefill.patterns._checks import at_least, density, multiple_of
from sparse_prefill.patterns._lines import all_line_scores, largest, line_scores
from sparse_prefill.plan import DensePlan, StripePlan
from sparse_prefill.validation import validate_attention_inputs

__all__ = ["VERTICAL_SLASH", "VerticalSlashIdentifier", "line_scores"]


@dataclass(frozen=True)
class _AllLines:
    """Every plan head's selection, one row per (batch, plan head); runs padded to a common count."""

    columns: torch.Tensor  # int64 [P, V], ascending, all >= sink
    run_first: torch.Tensor  # int64 [P, I], each run's largest offset, descending; padding runs -far
    run_last: torch.Tensor  # int64 [P, I], each run's smallest offset; padding runs +far


def _select_all(vertical: torch.Tensor, slash: torch.Tensor, count_vertical: int, count_slash: int, sink: int,
                local: int, group_rows: int) -> _AllLines:
    """The reference's selection for rows of line scores [P, N] at once: top columns outside the
    initial window, top diagonals outside the local one merged into runs (offsets <= group_rows apart)."""
    rows, seq_len = vertical.shape
    count_vertical = max(0, min(count_vertical, seq_len - sink))
    count_slash = max(0, min(count_slash, seq_len - local - 1))
    columns = (sink + largest(vertical[:, sink:], count_vertical)).sort(dim=-1).values
    offsets = (local + 1 + largest(slash[:, local + 1:], count_slash)).sort(dim=-1, descending=True).values
    # Consecutive runs lie more than group_rows apart within [local + 1, N - 1]: this many at most.
    runs = min(count_slash, (seq_len - local - 2) // (group_rows + 1) + 1) if count_slash else 0
    far = 4 * seq_len  # a padding run starts after every key and ends before it: it lists nothing
    run_first = offsets.new_full((rows, runs), -far)
    run_last = offsets.new_full((rows, runs), far)
    if runs:
        starts = torch.cat([torch.ones_like(offsets[:, :1], dtype=torch.bool),
                            offsets[:, :-1] - offsets[:, 1:] > group_rows], dim=1)
        run = starts.cumsum(dim=1) - 1
        run_first.scatter_reduce_(1, run, offsets, "amax")
        run_last.scatter_reduce_(1, run, offsets, "amin")
    return _AllLines(columns, run_first, run_last)


def _entries(lines: _AllLines, rows: slice, geometry: tuple[torch.Tensor, ...],
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For plan-head rows ``rows``: clipped runs (start, length [c, G, I]), the columns each group keeps
    (keep [c, G, V]) and the columns themselves per group (int64 [c, G, V])."""
    row_start, row_end, sink_end, local_start = (x[None, :, None] for x in geometry)
    run_start = row_start - lines.run_first[rows, None, :]  # run i covers [row_start - first_i,
    run_end = row_end - 1 - lines.run_last[rows, None, :]  # row_end - 1 - last_i] of a group's rows
    start = torch.maximum(run_start, sink_end)
    length = (torch.minimum(run_end, local_start - 1) - start + 1).clamp_min(0)
    columns = lines.columns[rows, None, :].expand(-1, row_start.shape[1], -1).contiguous()
    keep = (columns >= sink_end) & (columns < local_start)
    if run_start.shape[-1]:  # a column is listed when no run lists it already (runs sorted, disjoint)
        run = torch.searchsorted(run_start, columns, right=True) - 1
        keep &= ~((run >= 0) & (columns <= run_end.gather(2, run.clamp_min(0))))
    return start, length, keep, columns


def _chunks(rows: int, per_row: int) -> Iterator[slice]:
    """Slices of plan-head rows holding about CHUNK_ELEMENTS entries each, at least one row."""
    step = max(1, _blocks.CHUNK_ELEMENTS // max(per_row, 1))
    for start in range(0, rows, step):
        yield slice(start, min(start + step, rows))


def _counts(lines: _AllLines, geometry: tuple[torch.Tensor, ...],
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keys per segment [P, G], and per plan-head row the keys from runs and from columns [P] each."""
    rows, groups = lines.columns.shape[0], geometry[0].numel()
    counts = torch.empty(rows, groups, dtype=torch.int64, device=lines.columns.device)
    run_keys = torch.empty(rows, dtype=torch.int64, device=counts.device)
    column_keys = torch.empty_like(run_keys)
    for chunk in _chunks(rows, groups * (lines.run_first.shape[1] + lines.columns.shape[1] + 1)):
        _, length, keep, _ = _entries(lines, chunk, geometry)
        counts[chunk] = length.sum(dim=-1) + keep.sum(dim=-1)
        run_keys[chunk] = length.sum(dim=(1, 2))
        column_keys[chunk] = keep.sum(dim=(1, 2))
    return counts, run_keys, column_keys


def _list_keys(lines: _AllLines, geometry: tuple[torch.Tensor, ...], counts: torch.Tensor, run_keys: list[int],
               column_keys: list[int]) -> torch.Tensor:
    """Every segment's keys, ascending, written straight to their places (no sort): within a group,
    runs and kept columns are disjoint, so a key's place is the keys of both kinds below it."""
    rows, groups = counts.shape
    segment_start = (counts.flatten().cumsum(0) - counts.flatten()).view(rows, groups)
    indices = torch.empty(sum(run_keys) + sum(column_keys), dtype=torch.int32, device=counts.device)
    for chunk in _chunks(rows, groups * (lines.run_first.shape[1] + lines.columns.shape[1] + 1)):
        start, length, keep, columns = _entries(lines, chunk, geometry)
        kept_below = torch.nn.functional.pad(keep.cumsum(dim=-1), (1, 0))  # kept columns before column v
        run_keys_below = torch.nn.functional.pad(length.cumsum(dim=-1), (1, 0))  # run keys before run i
        first = segment_start[chunk, :, None]
        total = sum(run_keys[chunk])
        if total:
            below = torch.searchsorted(columns, start) if columns.shape[-1] else torch.zeros_like(start)
            base = (first + run_keys_below[..., :-1] + kept_below.gather(-1, below)).flatten()
            flat_length = length.flatten()
            within = torch.arange(total, device=counts.device) - torch.repeat_interleave(
                flat_length.cumsum(0) - flat_length, flat_length, output_size=total)
            keys = torch.repeat_interleave(start.flatten(), flat_length, output_size=total) + within
            indices[torch.repeat_interleave(base, flat_length, output_size=total) + within] = keys.to(torch.int32)
        total = sum(column_keys[chunk])
        if total:
            runs_below = torch.searchsorted(start, columns) if start.shape[-1] else torch.zeros_like(columns)
            place = first + kept_below[..., :-1] + run_keys_below.gather(-1, runs_below)
            kept = torch.nonzero_static(keep.flatten(), size=total).flatten()
            indices[place.flatten()[kept]] = columns.flatten()[kept].to(torch.int32)
    return indices


class VerticalSlashIdentifier(Identifier):
    """Scores lines from the last queries of every head at once, then lists each group's keys; any device."""

    def __init__(self, vertical: int, slash: int, last_q: int, block: int, sink: int, local: int,
                 share_kv_heads: bool, dense_above: float) -> None:
        self.vertical, self.slash, self.last_q, self.block = vertical, slash, last_q, block
        self.sink, self.local, self.share_kv_heads, self.dense_above = sink, local, share_kv_heads, dense_above

    def identify(self, q: torch.Tensor, k: torch.Tensor, ctx: AttentionContext) -> StripePlan | DensePlan:
        validate_attention_inputs(q, k, k)  # identification reads no v
        with torch.no_grad():
            return self._identify(q, k, ctx)

    def _identify(self, q: torch.Tensor, k: torch.Tensor, ctx: AttentionContext) -> StripePlan | DensePlan:
        batch, num_q, seq_len, _ = q.shape
        num_kv = k.shape[1]
        plan_heads = num_kv if self.share_kv_heads else num_q
        vertical, slash = all_line_scores(q, k, ctx.scale, min(self.last_q, seq_len))
        if self.share_kv_heads:  # the query heads of a KV group add their scores, in head order
            vertical, slash = (x.unflatten(1, (num_kv, -1)).sum(dim=2) for x in (vertical, slash))
        lines = _select_all(vertical.flatten(0, 1), slash.flatten(0, 1), self.vertical, self.slash, self.sink,
                            self.local, self.block)
        plan = StripePlan.empty(batch, plan_heads, seq_len, self.block, self.sink, self.local, q.device)
        geometry = plan.group_geometry(q.device)
        counts, run_keys, column_keys = _counts(lines, geometry)
        # The one host sync: the density, the list sizes and each plan head's bytes come back together.
        groups, rows = plan.num_groups, batch * plan_heads
        summary = torch.cat([counts.view(batch, plan_heads, groups).sum(dim=(0, 1)), run_keys, column_keys]).tolist()
        per_group, run_keys_host = summary[:groups], summary[groups:groups + rows]
        column_keys_host = summary[groups + rows:]
        if ctx.dense_fallback and plan.density_of_counts(sum(per_group), per_group[-1]) > self.dense_above:
            return DensePlan(batch, num_q, seq_len)
        per_row = [r + c for r, c in zip(run_keys_host, column_keys_host)]
        head_bytes = [4 * sum(per_row[h::plan_heads]) + 8 * batch * groups for h in range(plan_heads)]
        enforce_plan_budget(head_bytes, num_kv, ctx, per_query_head=not self.share_kv_heads)
        return plan.filled(counts, _list_keys(lines, geometry, counts, run_keys_host, column_keys_host))


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
