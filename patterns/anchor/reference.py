"""AnchorAttention identifier (stages 1-2) in plain PyTorch: fp32, one query group at a time, obviously right.

This is the specification the Triton kernel (:mod:`sparse_prefill.patterns.anchor.kernel`) must
match. Per batch ``b``, query head ``h`` and query group ``g`` of ``block * group_blocks`` rows:

1. Anchor: ``m_i = max_j scale * q_i . k_j`` over row ``i``'s window keys, the initial window
   ``[0, sink_end)`` plus the causal local window ``[local_start, i]``; NaN scores do not count
   (the GPU's max ignores them), so a row of NaN scores only gets ``-inf``.
2. Pool per ``block`` rows: ``pooled_q`` = mean of the q rows, ``pooled_anchor`` = mean of ``m_i``
   (a partial last block averages its valid rows). Only rows whose q and ``m_i`` are finite are
   pooled: a NaN row stays NaN in its own output (as in dense attention) but must not change what
   the other rows of its block select. A block with no such row selects nothing.
3. Keep candidate ``j`` in ``[sink_end, local_start)`` for the whole group if, for any block of the
   group (and, with ``share_kv_heads``, any query head of the KV group),
   ``scale * pooled_q . k_j + theta >= pooled_anchor``, compared in fp32, or that score is NaN (a
   non-finite key): its NaN then reaches the rows that attend it, as in dense attention. ``theta`` is
   one number, or one per query head (each pooled row compares with its own head's).

Selection is not differentiable: the plan is integers, and gradients (through a reference
executor) flow only through attention over the selected keys, as with a fixed mask.

Memory is O(group work): scores never exceed [B, Hq, group_rows, window] and
[B, Hq, group_blocks, candidates].
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import torch

from sparse_prefill.plan import DensePlan, StripePlan

__all__ = ["anchor_identify_reference", "head_thetas", "validate_anchor_inputs"]


def validate_anchor_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    scale: float,
    theta: float | Sequence[float],
    block: int,
    group_blocks: int,
    sink: int,
    local: int,
    share_kv_heads: bool,
    dense_tail: int = 0,
    dense_above: float = 1.0,
) -> None:
    """Shape and parameter checks shared by every anchor identifier; raises with what was received."""
    if not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor):
        raise TypeError(f"q and k must be torch.Tensor, got {type(q).__name__} and {type(k).__name__}")
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(
            f"q must be [B, Hq, N, D] and k [B, Hkv, N, D], got shapes {tuple(q.shape)} and {tuple(k.shape)}"
        )
    (batch, num_q, seq_len, head_dim), (k_batch, num_kv, k_len, k_dim) = q.shape, k.shape
    if (batch, seq_len, head_dim) != (k_batch, k_len, k_dim) or min(batch, seq_len, head_dim) == 0:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must share non-empty batch, sequence length and head dim"
        )
    if num_kv == 0 or num_q % num_kv:
        raise ValueError(f"query heads must be a positive multiple of KV heads (GQA), got Hq={num_q} and Hkv={num_kv}")
    if q.device != k.device:
        raise ValueError(f"q and k must be on one device, got {q.device} and {k.device}")
    for name, value, low in (("block", block, 1), ("group_blocks", group_blocks, 1), ("sink", sink, 0), ("local", local, 0),
                             ("dense_tail", dense_tail, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    thetas = list(theta) if isinstance(theta, (list, tuple)) else [theta]
    if isinstance(theta, (list, tuple)) and len(thetas) != num_q:
        raise ValueError(f"theta must be one number or one per query head ({num_q}), got {len(thetas)} values")
    for name, value in [("scale", scale)] + [("theta", t) for t in thetas]:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise ValueError(f"{name} must be a real number, got {value!r}")
    if not isinstance(share_kv_heads, bool):
        raise TypeError(f"share_kv_heads must be a bool, got {share_kv_heads!r}")
    if isinstance(dense_above, bool) or not isinstance(dense_above, (int, float)) or not 0 < dense_above <= 1:
        raise ValueError(f"dense_above must be a density in (0, 1], got {dense_above!r}")
    if not 0 < scale < math.inf:
        raise ValueError(f"scale must be positive and finite (usually 1/sqrt(head_dim)), got {scale}")


def head_thetas(theta: float | Sequence[float], num_q: int, device: torch.device) -> torch.Tensor:
    """theta of each query head, float32 [num_q] (validated by :func:`validate_anchor_inputs`); read-only.

    Built once per (thetas, device): a list copied to a GPU on every call would make PyTorch wait for the
    stream (a blocking host-to-device copy) inside each layer.
    """
    thetas = tuple(float(t) for t in theta) if isinstance(theta, (list, tuple)) else (float(theta),) * num_q
    return _theta_tensor(thetas, torch.device(device))


@functools.lru_cache(maxsize=256)
def _theta_tensor(thetas: tuple[float, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(thetas, dtype=torch.float32, device=device)


def _pool_blocks(rows: torch.Tensor, anchors: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean q rows [..., R, D] and mean anchors [..., R] per ``block`` rows -> [..., nb, D] and [..., nb],
    over the rows whose q and anchor are finite; a block without one gets q 0 and anchor +inf."""
    finite = torch.isfinite(rows).all(dim=-1) & torch.isfinite(anchors)
    pooled_q, pooled_anchor = [], []
    for q_chunk, anchor_chunk, ok in zip(rows.split(block, -2), anchors.split(block, -1), finite.split(block, -1)):
        count = ok.sum(dim=-1)
        pooled_q.append(torch.where(ok.unsqueeze(-1), q_chunk, 0.0).sum(dim=-2) / count.clamp(min=1).unsqueeze(-1))
        mean_anchor = torch.where(ok, anchor_chunk, 0.0).sum(dim=-1) / count.clamp(min=1)
        pooled_anchor.append(torch.where(count > 0, mean_anchor, float("inf")))
    return torch.stack(pooled_q, dim=-2), torch.stack(pooled_anchor, dim=-1)


def _row_anchors(
    queries: torch.Tensor, k: torch.Tensor, geometry: tuple[int, int, int, int], scale: float
) -> torch.Tensor:
    """Max score of each row over its window keys; queries [B, Hkv, g, R, D] -> [B, Hkv, g, R]."""
    row_start, row_end, sink_end, local_start = geometry
    window = torch.cat([k[:, :, :sink_end], k[:, :, local_start:row_end]], dim=2).unsqueeze(2)
    scores = scale * (queries @ window.transpose(-1, -2))
    key_pos = torch.cat([torch.arange(sink_end), torch.arange(local_start, row_end)]).to(k.device)
    row_pos = torch.arange(row_start, row_end, device=k.device)
    # Sink keys precede every row; only the local window needs the causal mask. NaN scores do not count.
    ignored = (key_pos[None, :] > row_pos[:, None]) | scores.isnan()
    return scores.masked_fill_(ignored, float("-inf")).amax(dim=-1)


def _group_keep(
    q: torch.Tensor,
    k: torch.Tensor,
    geometry: tuple[int, int, int, int],
    *,
    scale: float,
    theta: torch.Tensor,
    block: int,
    share_kv_heads: bool,
) -> torch.Tensor:
    """Which candidates [sink_end, local_start) one group keeps: bool [B, plan_heads, candidates].

    q is fp32 [B, Hkv, Hq/Hkv, N, D] (a view, K is never expanded), k is fp32 [B, Hkv, N, D], theta
    fp32 [Hkv, Hq/Hkv] (each query head's).
    """
    row_start, row_end, sink_end, local_start = geometry
    queries = q[:, :, :, row_start:row_end]
    pooled_q, pooled_anchor = _pool_blocks(queries, _row_anchors(queries, k, geometry, scale), block)
    candidates = k[:, :, sink_end:local_start].unsqueeze(2)
    pooled_scores = scale * (pooled_q @ candidates.transpose(-1, -2))
    anchor = pooled_anchor.unsqueeze(-1)
    kept = (pooled_scores + theta[:, :, None, None] >= anchor) | pooled_scores.isnan()
    keep = (kept & (anchor < float("inf"))).any(dim=3)
    return keep.any(dim=2) if share_kv_heads else keep.flatten(1, 2)


def anchor_identify_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    scale: float,
    theta: float | Sequence[float],
    block: int,
    group_blocks: int,
    sink: int,
    local: int,
    share_kv_heads: bool,
    dense_tail: int = 0,
    dense_above: float = 1.0,
) -> StripePlan | DensePlan:
    """AnchorAttention stripes for causal prefill: q [B, Hq, N, D], k [B, Hkv, N, D] -> validated StripePlan.

    Groups hold ``block * group_blocks`` query rows; plan heads are the KV heads when
    ``share_kv_heads`` (one key list per GQA group, the union over its query heads), else the
    query heads. ``theta`` is in natural-log units: larger keeps more keys; one per query head (a
    sequence) lets head groups calibrated apart share one call. Groups holding any of
    the last ``dense_tail`` rows keep every candidate: those rows (the question at the end of a
    prompt) are where retrieval happens, and mean-pooling over a block would dilute them. A plan
    denser than ``dense_above`` becomes a :class:`DensePlan`: dense attention is then faster and exact.
    """
    validate_anchor_inputs(
        q, k, scale=scale, theta=theta, block=block, group_blocks=group_blocks, sink=sink, local=local,
        share_kv_heads=share_kv_heads, dense_tail=dense_tail, dense_above=dense_above,
    )
    batch, num_q, seq_len, _ = q.shape
    num_kv = k.shape[1]
    plan_heads = num_kv if share_kv_heads else num_q
    plan = StripePlan.empty(batch, plan_heads, seq_len, block * group_blocks, sink, local, q.device)
    qf = q.float().unflatten(1, (num_kv, num_q // num_kv))
    kf = k.float()
    thetas = head_thetas(theta, num_q, q.device).view(num_kv, num_q // num_kv)
    segments, positions = [], []
    for group in range(plan.num_groups):
        geometry = plan.group_bounds(group)
        keep = _group_keep(qf, kf, geometry, scale=scale, theta=thetas, block=block, share_kv_heads=share_kv_heads)
        if geometry[1] > seq_len - dense_tail:
            keep = torch.ones_like(keep)
        b, h, candidate = keep.nonzero(as_tuple=True)
        segments.append((b * plan_heads + h) * plan.num_groups + group)
        positions.append(candidate + geometry[2])
    plan = _assemble(plan, torch.cat(segments), torch.cat(positions))
    return DensePlan(batch, num_q, seq_len) if plan.density() > dense_above else plan


def _assemble(layout: StripePlan, segments: torch.Tensor, positions: torch.Tensor) -> StripePlan:
    """Validated CSR plan from (segment, key) pairs that ascend by key within each segment."""
    counts = torch.bincount(segments, minlength=layout.offsets.numel() - 1)
    order = torch.sort(segments, stable=True).indices
    plan = layout.filled(counts, positions[order])
    plan.validate()
    return plan
