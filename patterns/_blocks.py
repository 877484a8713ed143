"""What the block-scoring patterns (`xattention`, `flashprefill`, `block-topk`) share: the
finite-only softmax, pooled means, the blocks every query block keeps, and one block mask per query
head turned into a BlockPlan.

A block mask is [..., nb, nb] bool, ``mask[I, J]``: query block ``I`` attends key block ``J``
(block-causal, ``J <= I``). Blocks are ``block`` rows or keys; the last may be shorter.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from sparse_prefill.interfaces import AttentionContext
from sparse_prefill.patterns._budget import enforce_plan_budget, plan_head_bytes
from sparse_prefill.kernels.runtime import host_copy
from sparse_prefill.plan import BlockPlan, DensePlan, PendingPlan

# Scores the vectorised identifiers hold at once (float32 entries): bounds a chunk of query rows
# times every key tile of every head to 256 MiB, whatever the sequence length.
CHUNK_ELEMENTS = 1 << 26


def pad_rows(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """x [..., N, D] in float32, zero rows appended up to a multiple of ``multiple``; contiguous, so rows can be
    viewed as tiles (with nothing to append, F.pad keeps a Hugging Face call's [B, N, H, D] layout)."""
    return F.pad(x.float(), (0, 0, 0, -x.shape[-2] % multiple)).contiguous()


def rows_float(x: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Rows [start, end) of x [..., N, D] in float32, zero rows past N: one chunk converted at a time,
    never a float32 copy of the whole input."""
    return F.pad(x[..., start:end, :].float(), (0, 0, 0, end - start - max(0, min(end, x.shape[-2]) - start)))


def finite_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim counting finite logits only; a row with none gives zeros.

    A NaN or infinite query row thus adds nothing to any block's score (its own output is NaN
    whatever is selected), and a NaN key takes no mass from the keys beside it.
    """
    logits = logits.masked_fill(~torch.isfinite(logits), float("-inf"))
    return torch.softmax(logits, dim=-1).nan_to_num(0.0)


def nonfinite_key_blocks(k: torch.Tensor, block: int) -> torch.Tensor:
    """[..., nb] bool: key blocks of k [..., N, D] holding a NaN or infinite entry. They are always
    kept, so that their NaN reaches the rows that attend them, as in dense attention. Read through each
    row's largest magnitude (NaN and inf survive it), not an elementwise mask the size of k."""
    bad = ~torch.isfinite(torch.linalg.vector_norm(k, ord=float("inf"), dim=-1))
    return F.pad(bad, (0, -bad.shape[-1] % block)).view(*bad.shape[:-1], -1, block).any(dim=-1)


def kept_always(num_blocks: int, device: torch.device | str) -> torch.Tensor:
    """[nb, nb] bool: the first key block and the diagonal block of every query block."""
    always = torch.eye(num_blocks, dtype=torch.bool, device=device)
    always[:, 0] = True
    return always


def causal_blocks(num_blocks: int, device: torch.device | str) -> torch.Tensor:
    """[nb, nb] bool: key block <= query block."""
    return torch.ones(num_blocks, num_blocks, dtype=torch.bool, device=device).tril()


def row_chunks(rows: int, align: int, row_cost: int) -> Iterator[tuple[int, int]]:
    """(start, end) chunks of ``rows`` rows, each a multiple of ``align`` rows (the last may be
    shorter) and about CHUNK_ELEMENTS / ``row_cost`` rows long, at least ``align``."""
    step = max(align, CHUNK_ELEMENTS // max(row_cost, 1) // align * align)
    for start in range(0, rows, step):
        yield start, min(start + step, rows)


def block_plan(mask: torch.Tensor, seq_len: int, block: int, num_kv_heads: int, ctx: AttentionContext,
               dense_above: float) -> BlockPlan | DensePlan | PendingPlan:
    """The BlockPlan of ``mask`` [B, Hq, nb, nb] (one list per query head), or a DensePlan when it is
    denser than ``dense_above`` and ``ctx`` allows it. One host sync sizes the plan (its density, its
    entries and its bytes per head come back together); raises PlanBudgetExceeded before allocating
    lists that would pass ``ctx.plan_budget``. With ``ctx.defer_sizing`` (and a budget), a
    :class:`~sparse_prefill.plan.PendingPlan` instead (see :func:`_sized_plan`)."""
    num_blocks = mask.shape[-1]
    diagonal = mask.diagonal(dim1=-2, dim2=-1).long()
    flat = mask.flatten()
    # Row-major nonzero lists each segment's key blocks ascending, segments in order; a flat position's key
    # block is its remainder (one int64 per entry, not a [total, 2] pair of them).
    return _sized_plan(mask.sum(dim=-1), diagonal, seq_len, block, num_kv_heads, ctx, dense_above,
                       lambda size: torch.nonzero_static(flat, size=size)[:, 0].remainder_(num_blocks))


def list_plan(lists: torch.Tensor, seq_len: int, block: int, num_kv_heads: int, ctx: AttentionContext,
              dense_above: float, unless: torch.Tensor | None = None) -> BlockPlan | DensePlan | PendingPlan | None:
    """:func:`block_plan` from key-block lists instead of a mask: ``lists`` [B, Hq, nb, width] int, each
    row its key blocks ascending and then ``nb`` for every empty place. A pattern that keeps at most
    ``width`` blocks per query block thus never builds an [nb, nb] mask per head (at 128k, 64-key
    blocks and 32 heads: 134M entries, each op on them a pass over 134 MB). ``unless``, a bool scalar
    on the device, is read in the same host sync: where it is true, None is returned (the caller takes
    another route, such as a mask, without a second sync in the usual case). A pending plan cannot wait
    for that route: where ``unless`` is true its verdict is 0 and it resolves to a DensePlan (exact)."""
    num_blocks = lists.shape[-2]
    listed = lists < num_blocks
    diagonal = (lists == torch.arange(num_blocks, device=lists.device)[:, None]).any(dim=-1).long()
    # Listed places come first in each row, so the flat positions of the listed ones are in CSR order.
    return _sized_plan(listed.sum(dim=-1), diagonal, seq_len, block, num_kv_heads, ctx, dense_above,
                       lambda size: lists.flatten()[torch.nonzero_static(listed.flatten(), size=size)[:, 0]],
                       unless)


def _sized_plan(counts: torch.Tensor, diagonal: torch.Tensor, seq_len: int, block: int, num_kv_heads: int,
                ctx: AttentionContext, dense_above: float, entries: Callable[[int], torch.Tensor],
                unless: torch.Tensor | None = None) -> BlockPlan | DensePlan | PendingPlan | None:
    """What block_plan and list_plan share: ``counts`` [B, Hq, nb] key blocks per segment, ``diagonal``
    (1 where a segment holds its own diagonal block); ``entries(size)`` returns the CSR's first ``size``
    key blocks (any values past the plan's own).

    With ``ctx.defer_sizing`` and a budget the key list is written before the host reads the counts, into
    a buffer of the most a plan that holds may list (``dense_above``'s bound or the budget, whichever is
    smaller), so the executor is queued at once; the :class:`~sparse_prefill.plan.PendingPlan`'s
    ``resolve()`` makes the decisions of the sized path."""
    batch, heads, num_blocks = counts.shape
    rows = torch.clamp(seq_len - torch.arange(num_blocks, device=counts.device) * block, max=block)
    # Key blocks before the diagonal are whole (block keys per row); the diagonal is a triangle.
    pairs = (counts - diagonal) * rows * block + diagonal * rows * (rows + 1) // 2
    head_bytes = plan_head_bytes(counts)
    offsets = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=counts.device)
    torch.cumsum(counts.flatten(), dim=0, out=offsets[1:])  # queued before the sync; wasted only on a dense plan
    all_pairs = batch * heads * seq_len * (seq_len + 1) / 2
    flag = [] if unless is None else [unless.long().view(1)]  # read in the same sync, where a caller asks
    summary = torch.cat([*flag, pairs.sum().view(1), counts.sum().view(1), head_bytes])
    fallback = ctx.dense_fallback

    def decide(total_pairs: int, head_bytes: list[int]) -> DensePlan | None:
        """A DensePlan, PlanBudgetExceeded raised, or None (the plan holds), from numbers on the host."""
        if fallback and total_pairs / all_pairs > dense_above:
            return DensePlan(batch, heads, seq_len)
        enforce_plan_budget([int(b) for b in head_bytes], num_kv_heads, ctx, per_query_head=True)
        return None

    if ctx.defer_sizing and ctx.plan_budget is not None:
        # int32 entries plus the offsets and enforce_plan_budget's 8 bytes must fit the budget
        capacity = (ctx.plan_budget - 8 - 8 * counts.numel()) // 4
        if fallback:
            capacity = min(capacity, BlockPlan.max_listed(batch, heads, seq_len, block, dense_above))
        holds = summary[len(flag) + 1] <= capacity
        if fallback:
            holds &= summary[len(flag)].double() / all_pairs <= dense_above
        if flag:
            holds &= ~unless
        verdict = holds.to(torch.int32).view(1)
        # Copied before the key list is written: resolve() waits for this alone.
        read_summary = host_copy(torch.cat([summary, verdict.long()]))
        indices = entries(max(capacity, 0)).to(torch.int32)

        def resolve() -> BlockPlan | DensePlan:
            *numbers, held = read_summary()
            if flag and numbers.pop(0):
                return DensePlan(batch, heads, seq_len, reason="a key block is not finite: dense attention")
            total_pairs, total, *bytes_per_head = numbers
            if (dense := decide(total_pairs, bytes_per_head)) is not None:
                return dense
            if not held:  # the executor wrote nothing; host and device arithmetic agree (the tests), so never
                return DensePlan(batch, heads, seq_len)  # in practice, but dense attention is exact either way
            return BlockPlan(batch, heads, seq_len, block, offsets, indices[:total])

        return PendingPlan(BlockPlan(batch, heads, seq_len, block, offsets, indices), verdict, resolve)

    numbers = summary.tolist()  # the one host sync
    if flag and numbers.pop(0):
        return None
    total_pairs, total, *bytes_per_head = numbers
    if (dense := decide(total_pairs, bytes_per_head)) is not None:
        return dense
    return BlockPlan(batch, heads, seq_len, block, offsets, entries(int(total)).to(torch.int32))


def block_means(x: torch.Tensor, block: int) -> torch.Tensor:
    """[..., nb, D] float32: means of consecutive ``block`` rows of x [..., N, D], over the rows that exist.
    Summed in float32 from x's own dtype: no float32 copy of x (for q at 128k, 32 heads: 2 GiB written and
    read again)."""
    seq_len = x.shape[-2]
    whole = seq_len // block * block
    sums = x[..., :whole, :].unflatten(-2, (-1, block)).sum(dim=-2, dtype=torch.float32)
    if whole < seq_len:  # a shorter last block
        sums = torch.cat([sums, x[..., whole:, :].sum(dim=-2, keepdim=True, dtype=torch.float32)], dim=-2)
    counts = torch.clamp(seq_len - torch.arange(sums.shape[-2], device=x.device) * block, max=block)
    return sums / counts[:, None]
