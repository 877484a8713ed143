"""Random valid plans for tests (every executor test builds its sparse layouts here), and the
masked dense attention that checks any plan's output."""

from __future__ import annotations

import torch

from sparse_prefill.plan import BlockPlan, StripePlan

__all__ = ["random_stripe_plan", "full_stripe_plan", "random_block_plan", "masked_attention"]


def _csr(per_segment: list[torch.Tensor], device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR (offsets int64, indices int32) from one sorted index tensor per segment."""
    counts = torch.tensor([0] + [len(entries) for entries in per_segment], dtype=torch.int64)
    indices = torch.cat([torch.zeros(0, dtype=torch.int64), *per_segment]).to(torch.int32)
    return counts.cumsum(0).to(device), indices.to(device)


def _pick_sorted(low: int, high: int, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """Sorted unique positions in [low, high), each kept with probability ``fraction``."""
    if high <= low:
        return torch.zeros(0, dtype=torch.int64)
    keep = torch.rand(high - low, generator=generator) < fraction
    return keep.nonzero().flatten() + low


def random_stripe_plan(
    batch: int,
    plan_heads: int,
    seq_len: int,
    group_rows: int,
    sink: int,
    local: int,
    fraction: float = 0.3,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> StripePlan:
    """A validated StripePlan selecting each candidate of each segment with probability ``fraction``.

    ``fraction=1`` selects every candidate, so the plan covers the whole causal range.
    """
    generator = torch.Generator().manual_seed(seed)
    layout = StripePlan.empty(batch, plan_heads, seq_len, group_rows, sink, local, "cpu")  # for group_bounds
    segments = []
    for _ in range(batch * plan_heads):
        for group in range(layout.num_groups):
            _, _, sink_end, local_start = layout.group_bounds(group)
            segments.append(_pick_sorted(sink_end, local_start, fraction, generator))
    offsets, indices = _csr(segments, device)
    plan = StripePlan(batch, plan_heads, seq_len, group_rows, sink, local, offsets, indices)
    plan.validate()
    return plan


def full_stripe_plan(
    batch: int,
    plan_heads: int,
    seq_len: int,
    group_rows: int,
    sink: int,
    local: int,
    device: torch.device | str = "cpu",
) -> StripePlan:
    """A StripePlan that selects every candidate: equivalent to dense causal attention."""
    return random_stripe_plan(batch, plan_heads, seq_len, group_rows, sink, local, fraction=1.0, device=device)


def random_block_plan(
    batch: int,
    heads: int,
    seq_len: int,
    block_size: int,
    fraction: float = 0.5,
    seed: int = 0,
    device: torch.device | str = "cpu",
    keep_diagonal: bool = True,
) -> BlockPlan:
    """A validated BlockPlan: the diagonal block always, each earlier block with probability ``fraction``.

    ``keep_diagonal=False`` picks the diagonal with probability ``fraction`` too, so some segments lack
    it or select nothing (valid plans, whose empty rows attend no key).
    """
    generator = torch.Generator().manual_seed(seed)
    num_blocks = -(-seq_len // block_size)
    segments = []
    for _ in range(batch * heads):
        for block in range(num_blocks):
            last = block if keep_diagonal else block + 1
            picked = _pick_sorted(0, last, fraction, generator)
            segments.append(torch.cat([picked, torch.tensor([block])]) if keep_diagonal else picked)
    offsets, indices = _csr(segments, device)
    plan = BlockPlan(batch, heads, seq_len, block_size, offsets, indices)
    plan.validate()
    return plan


def masked_attention(q, k, v, mask: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over a dense [B, plan heads, N, N] mask in fp32, K/V expanded: O(N^2), small N only."""
    num_q = q.shape[1]
    keys = k.float().repeat_interleave(num_q // k.shape[1], dim=1)
    values = v.float().repeat_interleave(num_q // v.shape[1], dim=1)
    allowed = mask.repeat_interleave(num_q // mask.shape[1], dim=1).to(q.device)
    scores = (scale * q.float() @ keys.transpose(-1, -2)).masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1) @ values, torch.logsumexp(scores, dim=-1)
