"""`streaming`: attention sink plus a local window (StreamingLLM's A-shape), with no selection.

Expressed as a :class:`~sparse_prefill.plan.StripePlan` with empty key lists: every row of a
query group attends the first ``sink`` keys and the ``local`` keys before its group plus its own
causal diagonal, so the window a row sees varies by at most ``group_rows`` keys.
"""

from __future__ import annotations

import torch

from sparse_prefill.interfaces import AttentionContext, Identifier, Parameter, PatternSpec
from sparse_prefill.patterns._checks import at_least, multiple_of
from sparse_prefill.plan import StripePlan


class StreamingIdentifier(Identifier):
    def __init__(self, sink: int, local: int, group_rows: int) -> None:
        self.sink, self.local, self.group_rows = sink, local, group_rows

    def identify(self, q: torch.Tensor, k: torch.Tensor, ctx: AttentionContext) -> StripePlan:
        batch, heads, seq_len = q.shape[0], k.shape[1], q.shape[2]
        groups = -(-seq_len // self.group_rows)
        return StripePlan(
            batch=batch,
            plan_heads=heads,
            seq_len=seq_len,
            group_rows=self.group_rows,
            sink=self.sink,
            local=self.local,
            offsets=torch.zeros(batch * heads * groups + 1, dtype=torch.int64, device=q.device),
            indices=torch.zeros(0, dtype=torch.int32, device=q.device),
        )


STREAMING = PatternSpec(
    name="streaming",
    description="attention sink + local window (A-shape), static",
    parameters={
        "sink": Parameter(int, 128, "initial keys every query attends", at_least(0)),
        "local": Parameter(int, 1024, "keys before each query group that it attends", at_least(0)),
        "group_rows": Parameter(int, 128, "query rows sharing one window", multiple_of(16)),
    },
    make_identifier=StreamingIdentifier,
)
