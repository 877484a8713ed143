"""`oracle`: the best stripe selection there is, from the exact attention it replaces (evaluation only).

For each 128-row query block (and KV group, or query head) it keeps the sink, the block's own diagonal and
then the key columns of most exact softmax mass until the block keeps ``recall`` of its mass
(:func:`~sparse_prefill.evaluation.recall.oracle_stripe_plan`). Run through a whole model it answers what no
per-layer recall can: how much a model's answers change when every layer keeps the most mass any
identifier of this granularity could keep at that density, the bound a real pattern is judged against.

It reads the exact softmax (one block of rows at a time, so memory stays O(rows x keys)), so it costs more
than dense attention and buys no speed: a yardstick, never a policy to ship. Its lists are known only once
built, so it checks ``ctx.plan_budget`` after building them (the dispatcher then splits the heads): one
over-budget plan is held for a moment, not kept.
"""

from __future__ import annotations

import torch

from sparse_prefill.interfaces import AttentionContext, Identifier, Parameter, PatternSpec
from sparse_prefill.patterns._budget import check_plan_budget
from sparse_prefill.patterns._checks import at_least, fraction, multiple_of
from sparse_prefill.plan import StripePlan


class OracleIdentifier(Identifier):
    def __init__(self, recall: float, block: int, sink: int, share_kv_heads: bool) -> None:
        self.recall, self.block, self.sink, self.share_kv_heads = recall, block, sink, share_kv_heads

    def identify(self, q: torch.Tensor, k: torch.Tensor, ctx: AttentionContext) -> StripePlan:
        from sparse_prefill.evaluation.recall import oracle_stripe_plan  # evaluation code, loaded when used

        plan = oracle_stripe_plan(q, k, ctx.scale, self.recall, block=self.block, sink=self.sink,
                                  share_kv_heads=self.share_kv_heads)
        check_plan_budget(plan.counts(), k.shape[1], ctx, per_query_head=not self.share_kv_heads)
        return plan


ORACLE = PatternSpec(
    name="oracle",
    description="evaluation only: the sparsest stripes keeping `recall` of every block's exact mass (slower than dense)",
    parameters={
        "recall": Parameter(float, 0.95, "softmax mass every query block keeps", fraction),
        "block": Parameter(int, 128, "query rows sharing one key list", multiple_of(16)),
        "sink": Parameter(int, 128, "initial keys every query attends", at_least(0)),
        "share_kv_heads": Parameter(bool, True, "one list per KV group (anchor's sharing); false: one per query head"),
    },
    make_identifier=OracleIdentifier,
)
