"""A cheap test at run time that a plan keeps the attention it should: the recall guard.

A pattern's settings are chosen on some models and texts; on another model a head can lose most of
its softmax mass (a row-specific head, or attention spread thinly over every key) and the answers
change. The guard checks each call before it runs: it computes the exact softmax of a few query rows
against every key (``rows`` rows out of N, so ``rows / N`` of the dense cost), measures the share of
that mass the plan keeps (attention recall), and runs dense every KV group whose query heads keep
less than ``min_recall`` on average over those rows. Calls and heads that pass run the plan as
made. It costs one host synchronisation per call (the decision) and, on the rows it samples,
``O(rows * N)`` memory per KV head: nothing grows with N^2.

The rows are spread evenly over the last three quarters of the prompt (rows in the first quarter
attend mostly their windows, which every plan keeps); the same rows for the same length, so a
decision is reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparse_prefill.plan import BlockPlan, DensePlan, Plan, StripePlan

__all__ = ["RecallGuard"]


@dataclass(frozen=True)
class RecallGuard:
    """Run dense the KV groups whose sampled query rows keep less than ``min_recall`` of their attention.

    ``min_recall`` in [0, 1]: 0 never intervenes, 1 makes every lossy head dense. ``rows``: query rows
    sampled per call (the test's cost and its noise both fall as 1/rows and grow with it).
    """

    min_recall: float = 0.95
    rows: int = 64

    def __post_init__(self) -> None:
        if isinstance(self.min_recall, bool) or not 0.0 <= float(self.min_recall) <= 1.0:
            raise ValueError(f"min_recall must be a number in [0, 1], got {self.min_recall!r}")
        if isinstance(self.rows, bool) or not isinstance(self.rows, int) or self.rows < 1:
            raise ValueError(f"rows must be an integer >= 1, got {self.rows!r}")

    def reason(self) -> str:
        """Why the guard made heads dense, as PrefillStats and the log say it."""
        return f"kept less than the guard's min_recall {self.min_recall} of the sampled rows' attention"

    def sample_rows(self, seq_len: int, device: torch.device) -> torch.Tensor:
        """int64 [min(rows, ...)] distinct rows spread evenly over [seq_len // 4, seq_len)."""
        first = seq_len // 4
        count = min(self.rows, seq_len - first)
        return torch.linspace(first, seq_len - 1, count, device=device).round().long().unique()

    def kv_head_recall(self, q: torch.Tensor, k: torch.Tensor, plan: Plan, scale: float) -> torch.Tensor:
        """float32 [Hkv]: per KV group, the lowest (over batch and its query heads) mean recall of the sampled
        rows under ``plan``. Runs on q's device; one KV head's scores [B, group, rows, N] at a time."""
        if not isinstance(plan, (StripePlan, BlockPlan, DensePlan)):
            raise TypeError(f"the recall guard takes stripe, block and dense plans, got {type(plan).__name__}")
        num_q, num_kv = q.shape[1], k.shape[1]
        group = num_q // num_kv
        rows = self.sample_rows(q.shape[2], q.device)
        mask = plan.rows_mask(rows)  # [B, plan heads, R, N]
        per_query_head = mask.shape[1] == num_q
        causal = torch.arange(q.shape[2], device=q.device) <= rows.unsqueeze(1)
        sampled_q = q[:, :, rows].float()
        recall = torch.empty(num_kv, device=q.device)
        for kv in range(num_kv):
            scores = sampled_q[:, kv * group:(kv + 1) * group] @ k[:, kv].float().transpose(-1, -2).unsqueeze(1)
            probabilities = torch.softmax((scores * scale).masked_fill(~causal, float("-inf")), dim=-1)
            selected = mask[:, kv * group:(kv + 1) * group] if per_query_head else mask[:, kv:kv + 1]
            kept = (probabilities * selected).sum(-1)  # [B, group, R]
            # A row whose scores are all NaN keeps nothing it could lose: it does not vote.
            recall[kv] = torch.nan_to_num(kept, nan=1.0).mean(-1).min()
        return recall

    def dense_kv_heads(self, q: torch.Tensor, k: torch.Tensor, plan: Plan, scale: float) -> list[bool]:
        """Whether each KV group must run dense (the one host synchronisation)."""
        return (self.kv_head_recall(q, k, plan, scale) < self.min_recall).tolist()
