"""`dense`: every query attends its whole causal prefix (the baseline, and a per-layer opt-out)."""

from __future__ import annotations

import torch

from sparse_prefill.interfaces import AttentionContext, Identifier, PatternSpec
from sparse_prefill.plan import DensePlan


class DenseIdentifier(Identifier):
    def identify(self, q: torch.Tensor, k: torch.Tensor, ctx: AttentionContext) -> DensePlan:
        return DensePlan(batch=q.shape[0], heads=q.shape[1], seq_len=q.shape[2])


DENSE = PatternSpec(
    name="dense",
    description="full causal attention (no sparsity)",
    parameters={},
    make_identifier=DenseIdentifier,
)
