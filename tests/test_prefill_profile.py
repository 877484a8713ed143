"""benchmarks/prefill_profile.py's A/B timings: the sizing A/B switches how every identifier sizes its plans, and
only while it times; the dense A/B applies and removes the policy in turn and leaves it applied."""

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


def test_dense_ab_alternates_the_policy_with_dense_and_leaves_it_applied(monkeypatch) -> None:
    profile = load_benchmark("prefill_profile")
    applied: list[object] = []
    calls: list[str] = []

    def apply(model, policy):
        assert not applied, "applied twice without remove"
        applied.append(policy)
        calls.append("apply")

    def remove(model):
        if not applied:
            raise RuntimeError("sparse prefill is not applied to this model")
        applied.pop()
        calls.append("remove")

    monkeypatch.setattr(profile.sparse_prefill, "apply", apply)
    monkeypatch.setattr(profile.sparse_prefill, "remove", remove)
    model = _OneIdentification()
    apply(model, "anchor")  # as main() leaves it before timing
    times = profile.time_against_dense(model, torch.zeros(1, 8, dtype=torch.long), repeats=1, rounds=3,
                                       policy="anchor")
    assert set(times) == {"policy", "dense"} and all(len(t) == 3 and min(t) > 0 for t in times.values())
    # The setup's apply; policy, dense | dense (nothing to remove), policy | policy, dense; the policy again.
    assert calls == ["apply", "remove", "apply", "remove", "apply", "remove", "apply", "remove", "apply"]
    assert applied == ["anchor"]


def test_grown_kernels_lists_what_a_policy_adds_over_dense_largest_first() -> None:
    profile = load_benchmark("prefill_profile")
    dense = {"sdpa": 90.0, "copy": 1.0, "matmul": 30.0}
    policy = {"sdpa": 15.0, "copy": 3.5, "matmul": 30.02, "scan": 4.0, "tiny": 0.01}
    grown = profile.grown_kernels(policy, dense)
    # New kernels count whole, grown ones by their growth; shrunk, unchanged and negligible ones are left out.
    assert list(grown) == ["scan", "copy"] and grown == {"scan": 4.0, "copy": 2.5}
    assert list(profile.grown_kernels(policy, dense, count=1)) == ["scan"]


def test_the_written_record_keeps_no_private_kernel_table() -> None:
    profile = load_benchmark("prefill_profile")
    record = {"length": 8, "results": {"dense": {"prefill_ms": 1.0, "_all_kernels_ms": {"sdpa": 1.0}}}}
    written = profile._without_private(record)
    assert written["results"]["dense"] == {"prefill_ms": 1.0} and "_all_kernels_ms" in record["results"]["dense"]
