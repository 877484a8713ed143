"""Sparse plans: the data structure an Identifier hands to an Executor.

A plan says, for every query row of a causal prefill, which keys it attends. Every plan is
device-resident, its memory grows with what it selects (never with N^2), and ``validate()``
checks it whole (the reference executor runs it on every plan it gets; the Triton executor
checks only the layout, which costs no host sync). Three kinds exist:

* :class:`DensePlan` - every query attends its whole causal prefix.
* :class:`StripePlan` - per (batch, plan head, query group): two dense windows plus a sorted
  list of discrete key positions ("stripes") between them.
* :class:`BlockPlan` - per (batch, head, query block): a sorted list of key blocks.

Sparse indices use one CSR layout: ``offsets`` (int64, length ``segments + 1``) and ``indices``
(int32, length ``offsets[-1]``); segment ``s`` owns ``indices[offsets[s]:offsets[s + 1]]``.
int64 offsets keep the layout valid beyond 2^31 selected entries.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields, replace
from typing import Callable, Union

import torch

__all__ = ["Plan", "DensePlan", "StripePlan", "BlockPlan", "PendingPlan", "plan_nbytes"]


def _check_csr(name: str, offsets: torch.Tensor, indices: torch.Tensor, segments: int) -> None:
    if offsets.dtype != torch.int64:
        raise TypeError(f"{name}.offsets must be int64, got {offsets.dtype}")
    if indices.dtype != torch.int32:
        raise TypeError(f"{name}.indices must be int32, got {indices.dtype}")
    if offsets.dim() != 1 or offsets.numel() != segments + 1:
        raise ValueError(
            f"{name}.offsets must have shape [{segments + 1}] (one entry per segment plus one), "
            f"got {tuple(offsets.shape)}"
        )
    if indices.dim() != 1:
        raise ValueError(f"{name}.indices must be 1-D, got shape {tuple(indices.shape)}")
    if offsets.device != indices.device:
        raise ValueError(f"{name}: offsets on {offsets.device} but indices on {indices.device}")
    nnz = indices.numel()
    if int(offsets[0]) != 0 or int(offsets[-1]) != nnz:
        raise ValueError(f"{name}.offsets must run from 0 to len(indices)={nnz}")
    if bool((offsets[1:] < offsets[:-1]).any()):
        raise ValueError(f"{name}.offsets must be non-decreasing")


def _rows_entries(offsets: torch.Tensor, indices: torch.Tensor, segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(position in ``segments``, index) of every CSR entry of the listed segments, gathered without a host loop
    (one host sync sizes the result)."""
    starts, counts = offsets[segments], offsets[segments + 1] - offsets[segments]
    total = int(counts.sum())
    owner = torch.repeat_interleave(torch.arange(segments.numel(), device=segments.device), counts, output_size=total)
    first = torch.cumsum(counts, 0) - counts
    position = torch.arange(total, device=segments.device) - first[owner] + starts[owner]
    return owner, indices[position].long()


def causal_rows_mask(rows: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Boolean [len(rows), seq_len]: the causal prefix ``[0, row]`` of each row in ``rows`` (on rows' device)."""
    return torch.arange(seq_len, device=rows.device) <= rows.unsqueeze(1)


def _select_heads(offsets: torch.Tensor, indices: torch.Tensor, shape: tuple[int, int, int], start: int,
                  stop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR (offsets, indices) of plan heads [start, stop) of a CSR laid out as ``shape`` = (batch, heads, groups).

    The heads' segments are consecutive within each batch entry, so this slices the CSR once per entry
    (one host sync reads where each slice starts and ends) instead of touching every entry."""
    batch, heads, groups = shape
    firsts = [(b * heads + start) * groups for b in range(batch)]
    lasts = [(b * heads + stop) * groups for b in range(batch)]
    bounds = offsets[torch.tensor(firsts + lasts, device=offsets.device)].tolist()
    new_offsets, new_indices, kept = [offsets.new_zeros(1)], [], 0
    for b in range(batch):
        lo, hi = bounds[b], bounds[batch + b]
        new_offsets.append(offsets[firsts[b] + 1:lasts[b] + 1] - lo + kept)
        new_indices.append(indices[lo:hi])
        kept += hi - lo
    return torch.cat(new_offsets), torch.cat(new_indices)


def _segment_ids(offsets: torch.Tensor, nnz: int) -> torch.Tensor:
    """Segment id of each CSR entry (length nnz), without a host loop."""
    counts = offsets[1:] - offsets[:-1]
    return torch.repeat_interleave(torch.arange(counts.numel(), device=offsets.device), counts, output_size=nnz)


@dataclass(frozen=True)
class DensePlan:
    """Every query attends its full causal prefix: executors run dense causal attention."""

    batch: int
    heads: int
    seq_len: int
    reason: str = ""  # why a sparse pattern's call runs dense, when something other than the pattern decided

    def density(self) -> float:
        return 1.0

    def rows_mask(self, rows: torch.Tensor) -> torch.Tensor:
        """Boolean [batch, heads, len(rows), seq_len]: the causal prefix of each row in ``rows``."""
        return causal_rows_mask(rows, self.seq_len).expand(self.batch, self.heads, -1, -1)

    def to_dense(self) -> torch.Tensor:
        mask = torch.ones(self.seq_len, self.seq_len, dtype=torch.bool).tril()
        return mask.expand(self.batch, self.heads, -1, -1)

    def validate(self) -> None:
        for name in ("batch", "heads", "seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"DensePlan.{name} must be positive, got {getattr(self, name)}")


@dataclass(frozen=True)
class StripePlan:
    """Dense windows plus discrete key columns, shared by the rows of a query group.

    Layout (``G = ceil(seq_len / group_rows)`` groups, ``Hp = plan_heads``):

    * Query group ``g`` holds rows ``[g * group_rows, min((g + 1) * group_rows, seq_len))``.
    * Its *local window* is ``[local_start, row]`` for each row (causal), where
      ``local_start = max(0, g * group_rows - local)``.
    * Its *initial window* (attention sink) is ``[0, sink_end)`` with
      ``sink_end = min(sink, local_start)``.
    * Its *candidates* are ``[sink_end, local_start)``; the selected ones are
      ``indices[offsets[s]:offsets[s + 1]]`` with ``s = (b * Hp + h) * G + g``, sorted
      ascending, unique. Windows and selection partition what a row attends: no key twice.
    * ``plan_heads`` is either the number of query heads or of KV heads; query head ``hq``
      reads plan head ``hq // (num_q_heads // plan_heads)``. With KV heads the query heads of
      one GQA group share a key list, so an executor can load each K/V tile once for all.

    Equivalent dense mask (for testing; O(N^2))::

        for b, h, g:
            rows = range(g * group_rows, min((g + 1) * group_rows, seq_len))
            mask[b, h, rows, :sink_end] = True
            mask[b, h, rows, selected(b, h, g)] = True
            mask[b, h, rows, local_start:] = causal
    """

    batch: int
    plan_heads: int
    seq_len: int
    group_rows: int
    sink: int
    local: int
    offsets: torch.Tensor
    indices: torch.Tensor

    @classmethod
    def empty(cls, batch: int, plan_heads: int, seq_len: int, group_rows: int, sink: int, local: int,
              device: torch.device | str) -> "StripePlan":
        """A plan that selects nothing (windows only): the layout identifiers fill in."""
        segments = batch * plan_heads * -(-seq_len // group_rows)
        offsets = torch.zeros(segments + 1, dtype=torch.int64, device=device)
        return cls(batch, plan_heads, seq_len, group_rows, sink, local, offsets, offsets.new_zeros(0, dtype=torch.int32))

    def filled(self, counts: torch.Tensor, indices: torch.Tensor) -> "StripePlan":
        """This layout with its key lists: ``counts`` keys per segment (any shape, segment order) and
        the lists concatenated in that order (cast to int32). Not validated: callers that build the
        lists with any risk call :meth:`validate`."""
        offsets = torch.zeros_like(self.offsets)
        torch.cumsum(counts.flatten().to(device=offsets.device, dtype=torch.int64), dim=0, out=offsets[1:])
        return replace(self, offsets=offsets, indices=indices.to(torch.int32))

    @property
    def num_groups(self) -> int:
        return -(-self.seq_len // self.group_rows)

    @property
    def device(self) -> torch.device:
        return self.indices.device

    def group_bounds(self, group: int) -> tuple[int, int, int, int]:
        """(row_start, row_end, sink_end, local_start) of one query group."""
        row_start = group * self.group_rows
        row_end = min(row_start + self.group_rows, self.seq_len)
        local_start = max(0, row_start - self.local)
        return row_start, row_end, min(self.sink, local_start), local_start

    def counts(self) -> torch.Tensor:
        """Selected keys per segment, shape [batch, plan_heads, num_groups]."""
        return (self.offsets[1:] - self.offsets[:-1]).view(self.batch, self.plan_heads, self.num_groups)

    def group_geometry(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, ...]:
        """Per-group int64 tensors (row_start, row_end, sink_end, local_start), each [num_groups]."""
        return _group_geometry(self.seq_len, self.group_rows, self.sink, self.local, device)

    def rows_mask(self, rows: torch.Tensor) -> torch.Tensor:
        """Boolean [batch, plan_heads, len(rows), seq_len]: the keys each row in ``rows`` (int64, on the plan's
        device) attends. Memory grows with the rows asked for, never N^2; one host sync."""
        keys = torch.arange(self.seq_len, device=rows.device)
        groups = rows // self.group_rows
        local_start = torch.clamp(groups * self.group_rows - self.local, min=0)
        sink_end = torch.clamp(local_start, max=self.sink)
        window = (keys < sink_end.unsqueeze(1)) | ((keys >= local_start.unsqueeze(1)) & (keys <= rows.unsqueeze(1)))
        mask = window.expand(self.batch, self.plan_heads, -1, -1).clone()
        heads = torch.arange(self.batch * self.plan_heads, device=rows.device).unsqueeze(1)
        segments = (heads * self.num_groups + groups).flatten()
        owner, keys_selected = _rows_entries(self.offsets, self.indices, segments)
        mask.view(-1, self.seq_len)[owner, keys_selected] = True
        return mask

    def select_heads(self, start: int, stop: int) -> "StripePlan":
        """The plan of plan heads [start, stop) alone (what the guard reports for the heads it left sparse)."""
        offsets, indices = _select_heads(self.offsets, self.indices, (self.batch, self.plan_heads, self.num_groups),
                                         start, stop)
        return replace(self, plan_heads=stop - start, offsets=offsets, indices=indices)

    def density(self) -> float:
        """Fraction of the causal score matrix this plan computes."""
        return self.density_with(self.counts().sum(dim=(0, 1)))

    def density_with(self, selected_per_group: torch.Tensor) -> float:
        """What :meth:`density` would be with ``selected_per_group[g]`` keys selected in group g, summed
        over batch and plan heads: an identifier can decide on it before writing any key list."""
        selected = selected_per_group.cpu().to(torch.int64)
        return self.density_of_counts(int(selected.sum()), int(selected[-1]))

    def density_of_counts(self, selected: int | torch.Tensor, selected_in_last_group: int | torch.Tensor
                          ) -> float | torch.Tensor:
        """:meth:`density_with` from two sums (all groups', and the last, possibly shorter, group's): plain
        integers, what an identifier reads in its one host sync, with no tensor work after it; or int64
        tensors on the device (a float64 tensor back, the same arithmetic, so host and device agree)."""
        last_rows = self.seq_len - (self.num_groups - 1) * self.group_rows
        stripes = self.group_rows * (selected - selected_in_last_group) + last_rows * selected_in_last_group
        heads, n = self.batch * self.plan_heads, self.seq_len
        window = _window_entries(self.seq_len, self.group_rows, self.sink, self.local)
        entries = heads * window + stripes
        if isinstance(entries, torch.Tensor):
            entries = entries.double()
        return entries / (heads * n * (n + 1) / 2)

    def max_selected(self, density_limit: float) -> int:
        """An upper bound on the selected entries of a plan of this layout whose density is at most
        ``density_limit``: the capacity a key list written before its size is read needs."""
        heads, n = self.batch * self.plan_heads, self.seq_len
        window = _window_entries(self.seq_len, self.group_rows, self.sink, self.local)
        stripe_entries = density_limit * (heads * n * (n + 1) / 2) - heads * window
        # The last group may be shorter: each of its keys counts fewer rows, so it can hold up to every key
        # (n per plan head) beyond what the full groups' rows allow.
        return max(0, int(stripe_entries // self.group_rows)) + 1 + heads * n  # + 1: float rounding

    def validate(self) -> None:
        for name in ("batch", "plan_heads", "seq_len", "group_rows"):
            if getattr(self, name) <= 0:
                raise ValueError(f"StripePlan.{name} must be positive, got {getattr(self, name)}")
        for name in ("sink", "local"):
            if getattr(self, name) < 0:
                raise ValueError(f"StripePlan.{name} must be >= 0, got {getattr(self, name)}")
        segments = self.batch * self.plan_heads * self.num_groups
        _check_csr("StripePlan", self.offsets, self.indices, segments)
        nnz = self.indices.numel()
        if nnz == 0:
            return
        seg = _segment_ids(self.offsets, nnz)
        group = seg % self.num_groups
        _, _, sink_end, local_start = self.group_geometry(self.device)
        idx = self.indices.long()
        if bool(((idx < sink_end[group]) | (idx >= local_start[group])).any()):
            raise ValueError(
                "StripePlan.indices must lie between each group's windows, in [sink_end, local_start)"
            )
        if bool(((seg[1:] == seg[:-1]) & (idx[1:] <= idx[:-1])).any()):
            raise ValueError("StripePlan.indices must be sorted ascending and unique within a segment")

    def to_dense(self) -> torch.Tensor:
        """Boolean mask [batch, plan_heads, seq_len, seq_len]; O(N^2), for tests and plots only."""
        n = self.seq_len
        mask = torch.zeros(self.batch, self.plan_heads, n, n, dtype=torch.bool)
        offsets = self.offsets.cpu()
        indices = self.indices.cpu().long()
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        for g in range(self.num_groups):
            row_start, row_end, sink_end, local_start = self.group_bounds(g)
            mask[:, :, row_start:row_end, :sink_end] = True
            mask[:, :, row_start:row_end, local_start:n] = causal[row_start:row_end, local_start:n]
            for b in range(self.batch):
                for h in range(self.plan_heads):
                    s = (b * self.plan_heads + h) * self.num_groups + g
                    mask[b, h, row_start:row_end, indices[offsets[s]:offsets[s + 1]]] = True
        return mask

    def __repr__(self) -> str:
        return (
            f"StripePlan(batch={self.batch}, plan_heads={self.plan_heads}, seq_len={self.seq_len}, "
            f"group_rows={self.group_rows}, sink={self.sink}, local={self.local}, "
            f"selected={self.indices.numel()}, density={self.density():.4f}, device={self.device})"
        )


def _group_geometry(seq_len: int, group_rows: int, sink: int, local: int, device: torch.device | str = "cpu"
                    ) -> tuple[torch.Tensor, ...]:
    row_start = torch.arange(-(-seq_len // group_rows), dtype=torch.int64, device=device) * group_rows
    row_end = torch.clamp(row_start + group_rows, max=seq_len)
    local_start = torch.clamp(row_start - local, min=0)
    return row_start, row_end, torch.clamp(local_start, max=sink), local_start


@functools.lru_cache(maxsize=64)
def _window_entries(seq_len: int, group_rows: int, sink: int, local: int) -> int:
    """Score entries one plan head's windows cover (row r: keys [0, sink_end) and [local_start, r]).
    Cached: every layer of a prefill asks for the same geometry."""
    row_start, row_end, sink_end, local_start = _group_geometry(seq_len, group_rows, sink, local)
    rows = row_end - row_start
    return int((rows * sink_end + rows * (row_start - local_start) + rows * (rows + 1) // 2).sum())


@dataclass(frozen=True)
class BlockPlan:
    """Key blocks per query block (the granularity of FlexPrefill, MInference and XAttention).

    Query block ``i`` holds rows ``[i * block_size, min((i + 1) * block_size, seq_len))`` and
    attends, for segment ``s = (b * heads + h) * num_blocks + i``, the key blocks
    ``indices[offsets[s]:offsets[s + 1]]`` (sorted, unique, each ``<= i``). The executor applies
    the causal mask inside the diagonal block.
    """

    batch: int
    heads: int
    seq_len: int
    block_size: int
    offsets: torch.Tensor
    indices: torch.Tensor

    @property
    def num_blocks(self) -> int:
        return -(-self.seq_len // self.block_size)

    @property
    def device(self) -> torch.device:
        return self.indices.device

    def counts(self) -> torch.Tensor:
        return (self.offsets[1:] - self.offsets[:-1]).view(self.batch, self.heads, self.num_blocks)

    @staticmethod
    def max_listed(batch: int, heads: int, seq_len: int, block_size: int, density_limit: float) -> int:
        """An upper bound on the key blocks a plan of this shape lists when its density is at most
        ``density_limit`` (the capacity a key list written before its size is read needs, as
        :meth:`StripePlan.max_selected`): every entry outside the diagonal and the last (maybe shorter)
        query block covers ``block_size`` x ``block_size`` pairs, and those two hold at most a query
        block's count each per head."""
        num_blocks = -(-seq_len // block_size)
        whole = density_limit * batch * heads * seq_len * (seq_len + 1) / 2 // (block_size * block_size)
        return int(whole) + 1 + 2 * batch * heads * num_blocks  # + 1: float rounding

    def rows_mask(self, rows: torch.Tensor) -> torch.Tensor:
        """Boolean [batch, heads, len(rows), seq_len]: the keys each row in ``rows`` (int64, on the plan's device)
        attends, causal. Memory grows with the rows asked for, never N^2; one host sync."""
        blocks = torch.zeros(self.batch * self.heads * rows.numel(), self.num_blocks, dtype=torch.bool,
                             device=rows.device)
        heads = torch.arange(self.batch * self.heads, device=rows.device).unsqueeze(1)
        segments = (heads * self.num_blocks + rows // self.block_size).flatten()
        owner, key_blocks = _rows_entries(self.offsets, self.indices, segments)
        blocks[owner, key_blocks] = True
        mask = blocks.repeat_interleave(self.block_size, dim=1)[:, : self.seq_len]
        return mask.view(self.batch, self.heads, rows.numel(), self.seq_len) & causal_rows_mask(rows, self.seq_len)

    def select_heads(self, start: int, stop: int) -> "BlockPlan":
        """The plan of heads [start, stop) alone (what the guard reports for the heads it left sparse)."""
        offsets, indices = _select_heads(self.offsets, self.indices, (self.batch, self.heads, self.num_blocks),
                                         start, stop)
        return replace(self, heads=stop - start, offsets=offsets, indices=indices)

    def density(self) -> float:
        """Fraction of the causal score matrix this plan computes, from the CSR alone (no N^2 mask)."""
        nnz = self.indices.numel()
        causal = self.batch * self.heads * self.seq_len * (self.seq_len + 1) / 2
        if nnz == 0:
            return 0.0
        query_block = _segment_ids(self.offsets, nnz) % self.num_blocks
        rows = torch.clamp(self.seq_len - query_block * self.block_size, max=self.block_size)
        # Blocks before the diagonal are whole (block_size keys per row); the diagonal is a triangle.
        pairs = torch.where(self.indices.long() < query_block, rows * self.block_size, rows * (rows + 1) // 2)
        return float(pairs.sum()) / causal

    def validate(self) -> None:
        for name in ("batch", "heads", "seq_len", "block_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"BlockPlan.{name} must be positive, got {getattr(self, name)}")
        segments = self.batch * self.heads * self.num_blocks
        _check_csr("BlockPlan", self.offsets, self.indices, segments)
        nnz = self.indices.numel()
        if nnz == 0:
            return
        seg = _segment_ids(self.offsets, nnz)
        query_block = seg % self.num_blocks
        idx = self.indices.long()
        if bool(((idx < 0) | (idx > query_block)).any()):
            raise ValueError("BlockPlan.indices must be key blocks in [0, query block] (causal)")
        if bool(((seg[1:] == seg[:-1]) & (idx[1:] <= idx[:-1])).any()):
            raise ValueError("BlockPlan.indices must be sorted ascending and unique within a segment")

    def to_dense(self) -> torch.Tensor:
        """Boolean mask [batch, heads, seq_len, seq_len]; O(N^2), for tests and plots only."""
        n, bs = self.seq_len, self.block_size
        blocks = torch.zeros(self.batch * self.heads * self.num_blocks, self.num_blocks, dtype=torch.bool)
        nnz = self.indices.numel()
        if nnz:
            blocks[_segment_ids(self.offsets.cpu(), nnz), self.indices.cpu().long()] = True
        blocks = blocks.view(self.batch, self.heads, self.num_blocks, self.num_blocks)
        mask = blocks.repeat_interleave(bs, dim=2).repeat_interleave(bs, dim=3)[:, :, :n, :n]
        return mask & torch.ones(n, n, dtype=torch.bool).tril()

    def to_stripe_plan(self) -> StripePlan:
        """The same mask as a StripePlan, to run a block plan on the stripe kernel (a benchmark's baseline).

        Query block ``i`` becomes query group ``i`` (``group_rows = block_size``) with ``sink = 0``
        and ``local = 0``, so the group's local window ``[i * block_size, row]`` is the diagonal block
        with its causal mask, and every selected block before it is expanded into its
        ``block_size`` key indices. Memory grows with the selected off-diagonal keys (never N^2).

        Exact only when every segment holds its diagonal block: a StripePlan always attends its
        local window, so a segment without it (a valid BlockPlan) cannot be expressed; that raises
        ValueError rather than returning a plan that attends more.
        """
        nnz = self.indices.numel()
        segments = self.batch * self.heads * self.num_blocks
        seg = _segment_ids(self.offsets, nnz)
        blocks = self.indices.long()
        diagonal = blocks == seg % self.num_blocks
        lacking = segments - int(diagonal.sum())  # one host sync; a sorted unique list holds the diagonal once at most
        if lacking:
            raise ValueError(
                f"{lacking} of {segments} BlockPlan segments lack their diagonal block; a StripePlan always attends "
                "its local window, so only plans whose every query block keeps its diagonal convert exactly"
            )
        # int32 throughout (keys < seq_len): the expanded list is the large tensor here.
        before = self.indices[~diagonal]
        within = torch.arange(self.block_size, dtype=torch.int32, device=before.device)
        keys = (before.unsqueeze(-1) * self.block_size + within).flatten()
        counts = (self.counts().flatten() - 1) * self.block_size
        layout = StripePlan.empty(self.batch, self.heads, self.seq_len, self.block_size, 0, 0, self.device)
        return layout.filled(counts, keys)

    def __repr__(self) -> str:
        return (
            f"BlockPlan(batch={self.batch}, heads={self.heads}, seq_len={self.seq_len}, "
            f"block_size={self.block_size}, selected_blocks={self.indices.numel()}, device={self.device})"
        )


Plan = Union[DensePlan, StripePlan, BlockPlan]


@dataclass(frozen=True)
class PendingPlan:
    """A plan queued on the device before the host has read its size: what an identifier may return
    when ``ctx.defer_sizing`` is set.

    Sizing a plan needs one host sync; after it the GPU waits while the host launches the kernels that
    write the key lists and run them. A pending plan is written into a buffer of bounded capacity
    before the sync, so the executor can be launched at once: ``verdict`` (int32, one element, on the
    device) is 1 where ``plan`` holds, 0 where it does not (denser than the pattern's ``dense_above``,
    or over the plan budget), and an executor that ``reads_verdict`` then writes nothing.
    ``resolve()`` is the host sync (for anchor, on counts copied to the host before the write pass was
    queued, so it waits for them, not for the kernels launched after): it returns the plan to report
    (``plan`` itself, its key list cut to its size, or a :class:`DensePlan` that must still run) or raises
    :class:`~sparse_prefill.interfaces.PlanBudgetExceeded`. Not a plan kind: no executor takes it;
    the dispatcher hands ``plan`` and ``verdict`` to one that reads verdicts, or resolves first.
    """

    plan: Plan
    verdict: torch.Tensor
    resolve: Callable[[], Plan]


def plan_nbytes(plan: object) -> int:
    """Device bytes held by a plan's tensors (any dataclass plan, third-party kinds included)."""
    tensors = (getattr(plan, f.name) for f in fields(plan))  # type: ignore[arg-type]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
