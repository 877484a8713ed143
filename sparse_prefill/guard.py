"""A cheap test at run time that a plan's output is the attention's: the error guard.

A pattern's settings are chosen on some models and texts; on another model a head can lose what
matters (a row-specific head, or attention spread thinly over every key) and the answers change. The
guard checks each sparse call after it runs: it computes exact attention for a few query rows
(``rows`` of N, so ``rows / N`` of the dense cost; each KV head's query rows stacked into one
matmul, K and V read in place), compares the
plan's output on those rows with it, and runs dense again every KV group whose query heads' relative
output error ``||O_plan - O|| / ||O||`` has a 90th percentile above ``max_error`` over those rows.
Groups that pass keep the plan's output, so a call that passes costs the test alone: a few
kernels and one host synchronisation (the decision), and ``O(rows * N)`` memory.

The 90th percentile is the sample's: the ceil(0.9 * count)-th smallest error (one kernel, no interpolation).

Why the output error and its 90th percentile: on Qwen2.5-Coder-0.5B at 32k (benchmarks/guard_signals.py,
docs/benchmarks/whole_model.md) it separates the five layers whose anchor plans cost the model most
(KL 0.016-0.083 each, p90 error 0.60-1.31) from the rest (KL <= 0.009, p90 error <= 0.38); attention
recall does not (a layer keeping 0.81 of the mass cost KL 0.076, another keeping 0.81 cost 0.002).

The rows are spread evenly over the last three quarters of the prompt (rows in the first quarter attend
mostly their windows, which every plan keeps); the same rows for the same length, so a decision is
reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import math

import torch

__all__ = ["ErrorGuard"]

# The share of sampled rows (per KV group, all its query heads pooled) allowed above max_error.
_QUANTILE = 0.9


# Bytes of float32 scores the exact rows may hold at once (KV groups are taken in chunks under it).
_SCORE_BYTES = 256 * 2**20


@lru_cache(maxsize=32)
def _sampled_rows(count: int, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows int64 [R], their causal mask as float32 0 / -inf [R, seq_len]) on ``device``, built once per shape."""
    first = seq_len // 4
    rows = sorted({round(first + i * (seq_len - 1 - first) / max(count - 1, 1)) for i in range(count)})
    rows_t = torch.tensor(rows[: seq_len - first], dtype=torch.int64, device=device)
    causal = torch.arange(seq_len, device=device) <= rows_t.unsqueeze(1)
    return rows_t, torch.zeros(causal.shape, device=device).masked_fill_(~causal, float("-inf"))


def _exact_rows(q_rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                scale: float) -> torch.Tensor:
    """Exact causal attention of the sampled rows, float32 [B, Hq, R, D]: each KV head's query heads stacked
    into one matrix (GQA read in place, no K/V copy), in chunks of KV heads whose scores fit _SCORE_BYTES."""
    batch, num_q, rows, dim = q_rows.shape
    num_kv, seq_len = k.shape[1], k.shape[2]
    group = num_q // num_kv
    stacked = q_rows.reshape(batch, num_kv, group * rows, dim)
    per_kv = batch * group * rows * seq_len * 4
    step = max(1, _SCORE_BYTES // per_kv)
    parts = []
    for start in range(0, num_kv, step):
        kv = slice(start, start + step)
        scores = torch.matmul(stacked[:, kv], k[:, kv].transpose(-1, -2)).float().mul_(scale)
        scores = scores.view(batch, -1, group, rows, seq_len).add_(bias).softmax(dim=-1)
        parts.append(torch.matmul(scores.view(batch, -1, group * rows, seq_len), v[:, kv].float()))
    return torch.cat(parts, dim=1).view(batch, num_q, rows, dim)


@dataclass(frozen=True)
class ErrorGuard:
    """Run dense the KV groups whose plan output, on sampled query rows, is further than ``max_error`` from exact.

    ``max_error`` >= 0: the largest relative output error allowed at the 90th percentile of the sampled rows
    (0 makes every lossy group dense; a large value never intervenes). ``rows``: query rows sampled per
    call (the test's cost grows with it, its noise falls).
    """

    max_error: float = 0.5
    rows: int = 64

    def __post_init__(self) -> None:
        if isinstance(self.max_error, bool) or not isinstance(self.max_error, (int, float)) or not self.max_error >= 0:
            raise ValueError(f"max_error must be a number >= 0, got {self.max_error!r}")
        if isinstance(self.rows, bool) or not isinstance(self.rows, int) or self.rows < 1:
            raise ValueError(f"rows must be an integer >= 1, got {self.rows!r}")

    def reason(self) -> str:
        """Why the guard made heads dense, as PrefillStats and the log say it."""
        return f"output error on sampled rows above the guard's max_error {self.max_error}"

    def sample_rows(self, seq_len: int, device: torch.device) -> torch.Tensor:
        """int64 [<= rows] distinct rows spread evenly over [seq_len // 4, seq_len)."""
        return _sampled_rows(self.rows, seq_len, torch.device(device))[0]

    def kv_head_errors(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                       scale: float) -> torch.Tensor:
        """float32 [Hkv]: per KV group, the 90th percentile over batch, its query heads and the sampled rows of
        ``||out - O|| / ||O||``, with O exact attention of those rows. ``out`` is the plan's output [B, Hq, N, D]."""
        rows, bias = _sampled_rows(self.rows, q.shape[2], q.device)
        exact = _exact_rows(q[:, :, rows], k, v, bias, scale)
        difference = torch.linalg.vector_norm(out[:, :, rows].float() - exact, dim=-1)
        error = torch.nan_to_num(difference / torch.linalg.vector_norm(exact, dim=-1).clamp_min(1e-6), nan=0.0)
        # (a row with no finite output has nothing a plan could lose)
        batch, num_kv = q.shape[0], k.shape[1]
        per_group = error.view(batch, num_kv, -1).transpose(0, 1).reshape(num_kv, -1)
        rank = max(1, math.ceil(_QUANTILE * per_group.shape[1]))  # the sample's 90th percentile, one kernel
        return per_group.kthvalue(rank, dim=1).values

    def dense_kv_heads(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                       scale: float) -> list[bool]:
        """Whether each KV group must run dense (the one host synchronisation)."""
        return (self.kv_head_errors(q, k, v, out, scale) > self.max_error).tolist()
