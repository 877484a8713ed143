"""benchmarks/prefill_profile.py's sizing A/B switches how every identifier sizes its plans, and only while it times."""

from __future__ import annotations

import dataclasses

import torch

from benchmark_scripts import load_benchmark
from sparse_prefill.interfaces import AttentionContext
from sparse_prefill.patterns.anchor import ANCHOR, AnchorIdentifier
from sparse_prefill.plan import DensePlan


class _OneIdentification(torch.nn.Module):
    """A stand-in model: each forward asks anchor for a plan the way the dispatcher does (defer_sizing on)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.identifier = ANCHOR.build()
        self.q, self.k = torch.zeros(1, 2, 8, 16), torch.zeros(1, 1, 8, 16)

    def forward(self, ids: torch.Tensor, **kwargs: object) -> None:
        ctx = dataclasses.replace(AttentionContext.for_inputs(self.q, self.k), defer_sizing=True)
        self.identifier.identify(self.q, self.k, ctx)


def test_sizing_ab_runs_both_ways_and_restores_the_identifier(monkeypatch) -> None:
    seen: list[bool] = []

    def recording(self, q, k, ctx):
        seen.append(ctx.defer_sizing)
        return DensePlan(q.shape[0], q.shape[1], q.shape[2])

    monkeypatch.setattr(AnchorIdentifier, "identify", recording)
    profile = load_benchmark("prefill_profile")
    times = profile.time_sizing(_OneIdentification(), torch.zeros(1, 8, dtype=torch.long), repeats=1, rounds=2)
    assert set(times) == {"pending", "sized"} and all(len(t) == 2 and min(t) > 0 for t in times.values())
    # Each median is one warm-up and one timed forward; round 0 runs pending first, round 1 sized first.
    assert seen == [True, True, False, False, False, False, True, True]
    assert AnchorIdentifier.identify is recording


def test_sizing_ab_switches_every_identifier_class_and_restores_each(monkeypatch) -> None:
    from sparse_prefill.patterns.block_topk import BlockTopkIdentifier

    profile = load_benchmark("prefill_profile")
    classes = profile._identifier_classes()
    assert AnchorIdentifier in classes and BlockTopkIdentifier in classes
    seen: list[bool] = []

    def recording(self, q, k, ctx):
        seen.append(ctx.defer_sizing)
        return DensePlan(q.shape[0], q.shape[1], q.shape[2])

    monkeypatch.setattr(BlockTopkIdentifier, "identify", recording)
    model = _OneIdentification()
    model.identifier = BlockTopkIdentifier(blocks=2, block=16, dense_above=0.4)
    profile.time_sizing(model, torch.zeros(1, 8, dtype=torch.long), repeats=1, rounds=1)
    assert seen == [True, True, False, False]
    assert vars(BlockTopkIdentifier)["identify"] is recording
