"""Plain PyTorch executors: float32 math, one query group (or block) at a time, obviously right.

They are the specification every kernel is tested against, and they run on any device (float64
inputs in float64). Memory stays O(group work): a query group's scores are [B, Hq, rows, keys it
attends], never N x N. They are plain autograd ops, so gradients flow through the selected keys.
Each row's softmax is its own: a NaN q row is NaN in its output alone; a NaN k or v row reaches
every row that attends it (a NaN v row, through 0 x NaN in P @ V, possibly other rows too, as in
torch's own SDPA kernels).

Head layout shared by all three (``Hp`` = plan heads, ``P = Hp // Hkv``, ``Qp = Hq // Hp``):
q is viewed as [B, Hkv, P, Qp, N, D], so query head ``hq`` reads plan head ``hq // Qp`` and KV
head ``hq // (Hq // Hkv)``. Keys shared by a whole KV head multiply the flattened query rows of
all its plan heads at once; K and V are gathered per plan head, never copied per query head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sparse_prefill.plan import BlockPlan, StripePlan, causal_rows_mask
from sparse_prefill.validation import validate_attention_inputs

__all__ = [
    "stripe_attention_reference",
    "block_attention_reference",
    "dense_attention_reference",
    "sampled_rows_reference",
    "validate_plan_layout",
]

_DENSE_CHUNK_ROWS = 256  # query rows per step of the dense reference: bounds its scores to [.., 256, N]

Parts = list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def validate_plan_layout(q: torch.Tensor, k: torch.Tensor, plan: StripePlan | BlockPlan) -> int:
    """Check the plan's batch, seq_len and heads against q and k; returns the plan's head count."""
    kind = type(plan).__name__
    heads = plan.plan_heads if isinstance(plan, StripePlan) else plan.heads
    batch, num_q, seq_len, _ = q.shape
    num_kv = k.shape[1]
    if (plan.batch, plan.seq_len) != (batch, seq_len):
        raise ValueError(
            f"{kind} was built for batch={plan.batch}, seq_len={plan.seq_len} but q has batch={batch}, "
            f"seq_len={seq_len}; build the plan from these q and k"
        )
    if heads not in (num_q, num_kv):
        raise ValueError(
            f"{kind} has {heads} heads; allowed: the query heads ({num_q}) or the KV heads ({num_kv})"
        )
    for name in ("offsets", "indices"):
        if getattr(plan, name).device != q.device:
            raise ValueError(f"{kind}.{name} lives on {getattr(plan, name).device} but q on {q.device}; "
                             "build the plan on q's device")
    return heads


def _bmm(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x [B, Hkv, P, M, K] @ y [B, Hkv, P or 1, K, L]; a y shared by the P plan heads is not copied P times."""
    if y.shape[2] == x.shape[2]:
        return x @ y
    return (x.flatten(2, 3) @ y.squeeze(2)).unflatten(2, x.shape[2:4])


def _attend(q: torch.Tensor, parts: Parts, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One softmax over several key sets; returns (out [B, Hkv, P, M, D], lse [B, Hkv, P, M]).

    q is [B, Hkv, P, M, D]; each part is (keys [B, Hkv, P or 1, L, D], values likewise, allowed
    bool broadcastable to [B, Hkv, P, M, L]). A row that allows nothing gets output 0 and lse -inf.
    """
    scores = torch.cat(
        [(scale * _bmm(q, keys.transpose(-1, -2))).masked_fill(~allowed, float("-inf")) for keys, _, allowed in parts],
        dim=-1,
    )
    row_max = scores.amax(dim=-1, keepdim=True)
    probs = torch.exp(scores - torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)))
    denom = probs.sum(dim=-1)
    widths = [keys.shape[-2] for keys, _, _ in parts]
    acc = sum(_bmm(p, values) for p, (_, values, _) in zip(probs.split(widths, dim=-1), parts))
    out = acc / torch.where(denom > 0, denom, torch.ones_like(denom)).unsqueeze(-1)
    return out, row_max.squeeze(-1) + torch.log(denom)


def _padded_segments(
    offsets: torch.Tensor, indices: torch.Tensor, segments: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR entries of ``segments`` padded to the longest: (entries int64 [S, L], valid bool [S, L])."""
    start = offsets[segments]
    count = offsets[segments + 1] - start
    width = int(count.max()) if segments.numel() else 0
    slot = torch.arange(width, device=offsets.device)
    valid = slot < count.unsqueeze(-1)
    where = (start.unsqueeze(-1) + slot).clamp(max=max(indices.numel() - 1, 0))
    return indices[where].long().masked_fill(~valid, 0), valid


def _gather_rows(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rows of x [B, Hkv, N, D] at positions [B, Hkv, P, L] -> [B, Hkv, P, L, D]."""
    flat = positions.flatten(2)
    rows = x.gather(2, flat.unsqueeze(-1).expand(-1, -1, -1, x.shape[-1]))
    return rows.view(*positions.shape, x.shape[-1])


class _Heads:
    """q, k, v in float32 with q viewed [B, Hkv, P, Qp, N, D]; collects outputs in the same view."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan_heads: int, return_lse: bool) -> None:
        batch, num_q, seq_len, head_dim = q.shape
        self.num_kv = k.shape[1]
        self.per_kv = plan_heads // self.num_kv  # P: plan heads per KV head
        self.per_plan = num_q // plan_heads  # Qp: query heads per plan head
        dtype = torch.promote_types(q.dtype, torch.float32)  # float32 math; float64 inputs keep float64
        self.q = q.to(dtype).view(batch, self.num_kv, self.per_kv, self.per_plan, seq_len, head_dim)
        self.k, self.v = k.to(dtype), v.to(dtype)
        self.out = torch.empty_like(self.q)
        self.lse = torch.empty(self.q.shape[:-1], device=q.device) if return_lse else None

    def rows(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries of rows [start, end) as [B, Hkv, P, Qp * R, D], and each stacked row's position."""
        positions = torch.arange(start, end, device=self.q.device).repeat(self.per_plan)
        return self.q[..., start:end, :].flatten(3, 4), positions

    def store(self, start: int, end: int, out: torch.Tensor, lse: torch.Tensor) -> None:
        self.out[..., start:end, :] = out.unflatten(3, (self.per_plan, end - start))
        if self.lse is not None:
            self.lse[..., start:end] = lse.unflatten(3, (self.per_plan, end - start))

    def result(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = self.out.flatten(1, 3).to(dtype)
        return out, None if self.lse is None else self.lse.flatten(1, 3)


def _segment_ids(batch: int, heads: int, num_segments_per_head: int, index: int, device: torch.device) -> torch.Tensor:
    """CSR segment of (b, h, index) for every b and h, flattened b-major: [batch * heads]."""
    bh = torch.arange(batch * heads, device=device)
    return bh * num_segments_per_head + index


def stripe_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: StripePlan,
    scale: float,
    return_lse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal attention over a StripePlan: per group, the two windows plus the selected keys.

    Returns (out [B, Hq, N, D] in q's dtype, lse [B, Hq, N] float32 natural log, or None).
    """
    validate_attention_inputs(q, k, v)
    plan_heads = validate_plan_layout(q, k, plan)
    heads = _Heads(q, k, v, plan_heads, return_lse)
    batch, num_kv, per_kv = q.shape[0], heads.num_kv, heads.per_kv
    for group in range(plan.num_groups):
        row_start, row_end, sink_end, local_start = plan.group_bounds(group)
        queries, row_pos = heads.rows(row_start, row_end)
        positions = torch.arange(row_end, device=q.device)
        window = torch.cat([positions[:sink_end], positions[local_start:]])
        window_allowed = window.unsqueeze(0) <= row_pos.unsqueeze(-1)  # sink keys precede every row
        segments = _segment_ids(batch, plan_heads, plan.num_groups, group, q.device)
        selected, valid = _padded_segments(plan.offsets, plan.indices, segments)
        selected = selected.view(batch, num_kv, per_kv, -1)
        selected_allowed = valid.view(*selected.shape).unsqueeze(-2)
        parts = [
            (heads.k[:, :, None, window], heads.v[:, :, None, window], window_allowed),
            (_gather_rows(heads.k, selected), _gather_rows(heads.v, selected), selected_allowed),
        ]
        heads.store(row_start, row_end, *_attend(queries, parts, scale))
    return heads.result(q.dtype)


def block_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: BlockPlan,
    scale: float,
    return_lse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal attention over a BlockPlan: per query block, its selected key blocks, causal inside.

    Returns (out [B, Hq, N, D] in q's dtype, lse [B, Hq, N] float32 natural log, or None).
    """
    validate_attention_inputs(q, k, v)
    plan_heads = validate_plan_layout(q, k, plan)
    heads = _Heads(q, k, v, plan_heads, return_lse)
    batch, seq_len, size = q.shape[0], q.shape[2], plan.block_size
    for block in range(plan.num_blocks):
        row_start, row_end = block * size, min((block + 1) * size, seq_len)
        queries, row_pos = heads.rows(row_start, row_end)
        segments = _segment_ids(batch, plan_heads, plan.num_blocks, block, q.device)
        blocks, valid = _padded_segments(plan.offsets, plan.indices, segments)
        keys = (blocks.unsqueeze(-1) * size + torch.arange(size, device=q.device)).flatten(1)
        valid = valid.repeat_interleave(size, dim=1) & (keys < seq_len)
        keys = keys.clamp(max=seq_len - 1).view(batch, heads.num_kv, heads.per_kv, -1)
        allowed = valid.view(*keys.shape).unsqueeze(-2) & (keys.unsqueeze(-2) <= row_pos.unsqueeze(-1))
        parts = [(_gather_rows(heads.k, keys), _gather_rows(heads.v, keys), allowed)]
        heads.store(row_start, row_end, *_attend(queries, parts, scale))
    return heads.result(q.dtype)


def dense_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    return_lse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Dense causal attention in float32, chunked over query rows (the truth in tests).

    Returns (out [B, Hq, N, D] in q's dtype, lse [B, Hq, N] float32 natural log, or None).
    """
    validate_attention_inputs(q, k, v)
    heads = _Heads(q, k, v, k.shape[1], return_lse)
    seq_len = q.shape[2]
    for row_start in range(0, seq_len, _DENSE_CHUNK_ROWS):
        row_end = min(row_start + _DENSE_CHUNK_ROWS, seq_len)
        queries, row_pos = heads.rows(row_start, row_end)
        keys = torch.arange(row_end, device=q.device)
        allowed = keys.unsqueeze(0) <= row_pos.unsqueeze(-1)
        parts = [(heads.k[:, :, None, :row_end], heads.v[:, :, None, :row_end], allowed)]
        heads.store(row_start, row_end, *_attend(queries, parts, scale))
    return heads.result(q.dtype)


def sampled_rows_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor,
                           scale: float) -> torch.Tensor:
    """Exact causal attention of query rows ``rows`` only: SDPA in float32 (float64 for float64 inputs) with
    those rows' causal mask. Returns [B, Hq, R, D] in that dtype; memory O(R * N) per head."""
    validate_attention_inputs(q, k, v)
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return F.scaled_dot_product_attention(q[:, :, rows].to(dtype), k.to(dtype), v.to(dtype),
                                          attn_mask=causal_rows_mask(rows, k.shape[2]),
                                          scale=scale, enable_gqa=q.shape[1] != k.shape[1])
