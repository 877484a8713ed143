"""The error guard: plans' row masks and head selections, the guard's errors, and what runs dense."""

from __future__ import annotations

import pytest
import torch

from plan_factories import masked_attention, random_block_plan, random_stripe_plan
from sparse_prefill import load_policy
from sparse_prefill.dispatch import sparse_attention
from sparse_prefill.guard import ErrorGuard, GuardMemory
from sparse_prefill.interfaces import AttentionContext, Identifier
from sparse_prefill.plan import BlockPlan, DensePlan, StripePlan
from sparse_prefill.policy import PolicyError

SHAPES = [  # batch, plan heads, seq_len, group_rows or block size, sink, local
    (1, 2, 200, 32, 16, 32),
    (2, 3, 130, 16, 0, 48),
    (1, 4, 97, 64, 8, 0),
]


def _rows(seq_len: int, count: int, seed: int) -> torch.Tensor:
    return torch.randperm(seq_len, generator=torch.Generator().manual_seed(seed))[:count].sort().values


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fraction", [0.0, 0.3, 1.0])
def test_rows_mask_equals_the_plans_dense_mask(shape, fraction):
    batch, heads, n, size, sink, local = shape
    rows = _rows(n, 11, seed=n)
    stripe = random_stripe_plan(batch, heads, n, size, sink, local, fraction=fraction, seed=heads)
    block = random_block_plan(batch, heads, n, size, fraction=fraction, seed=heads)
    for plan in (stripe, block, DensePlan(batch, heads, n)):
        assert torch.equal(plan.rows_mask(rows), plan.to_dense()[:, :, rows])


@pytest.mark.parametrize("shape", SHAPES)
def test_select_heads_keeps_exactly_those_heads(shape):
    batch, heads, n, size, sink, local = shape
    stripe = random_stripe_plan(batch, heads, n, size, sink, local, fraction=0.4, seed=1)
    block = random_block_plan(batch, heads, n, size, fraction=0.4, seed=2)
    for plan in (stripe, block):
        for start, stop in [(0, 1), (1, heads), (0, heads)]:
            part = plan.select_heads(start, stop)
            part.validate()
            assert torch.equal(part.to_dense(), plan.to_dense()[:, start:stop])


def _brute_force_errors(q, k, v, out, scale, rows):
    """90th percentile per KV group of ||out - O|| / ||O|| over batch, its query heads and ``rows``, O from the
    full N x N softmax."""
    group = q.shape[1] // k.shape[1]
    n = q.shape[2]
    scores = (q @ k.repeat_interleave(group, 1).transpose(-1, -2)) * scale
    p = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
    exact = (p @ v.repeat_interleave(group, 1))[:, :, rows]
    error = (out[:, :, rows] - exact).norm(dim=-1) / exact.norm(dim=-1)
    return torch.stack([error[:, h * group:(h + 1) * group].flatten().quantile(0.9) for h in range(k.shape[1])])


def test_guard_errors_match_brute_force():
    torch.manual_seed(0)
    batch, hq, hkv, n, d = 2, 4, 2, 160, 16
    q, k, v = torch.randn(batch, hq, n, d) * 2, torch.randn(batch, hkv, n, d), torch.randn(batch, hkv, n, d)
    out = torch.randn(batch, hq, n, d)
    guard = ErrorGuard(max_error=0.5, rows=20)
    errors = guard.kv_head_errors(q, k, v, out, d ** -0.5)
    expected = _brute_force_errors(q, k, v, out, d ** -0.5, guard.sample_rows(n, q.device))
    assert torch.allclose(errors, expected, atol=1e-5)


def test_sampled_rows_are_distinct_and_in_the_last_three_quarters():
    for n, count in [(1000, 64), (10, 64), (1, 3), (4096, 1)]:
        rows = ErrorGuard(rows=count).sample_rows(n, torch.device("cpu"))
        assert rows.numel() == min(count, n - n // 4)
        assert torch.equal(rows, rows.unique()) and int(rows.min()) >= n // 4 and int(rows.max()) < n


class _FixedPlan(Identifier):
    """Hands out one prepared plan (the guard's behaviour is what is under test, not a pattern)."""

    def __init__(self, plan):
        self.plan = plan

    def identify(self, q, k, ctx):
        return self.plan


def _windows_only_plan(batch: int, kv_heads: int, n: int) -> StripePlan:
    return StripePlan.empty(batch, kv_heads, n, 32, 0, 0, "cpu")  # each row sees its own 32-row group only


def _inputs_far_key(batch=1, hq=4, hkv=2, n=128, d=16):
    """Random q/k/v where KV head 0's queries all point at key 3 (outside every window but the first group's)
    and KV head 1's queries at their own key: a windows-only plan loses most of head 0's mass, little of 1's."""
    torch.manual_seed(1)
    q, k, v = torch.randn(batch, hq, n, d) * 0.1, torch.randn(batch, hkv, n, d), torch.randn(batch, hkv, n, d)
    direction = torch.randn(d)
    k[:, 0] *= 0.1
    k[:, 0, 3] = direction * 4
    q[:, : hq // 2] += direction * 4
    q[:, hq // 2:] = 20 * k[:, 1:2]
    return q, k, v


def test_guard_runs_dense_only_the_lossy_kv_group_and_says_why():
    q, k, v = _inputs_far_key()
    plan = _windows_only_plan(1, 2, q.shape[2])
    ctx = AttentionContext.for_inputs(q, k)
    seen = []
    out, _ = sparse_attention(q, k, v, _FixedPlan(plan), ctx, guard=ErrorGuard(max_error=0.5, rows=16),
                              on_plan=lambda p, c: seen.append((p, c.head_offset, c.num_q_heads)))
    dense = masked_attention(q, k, v, DensePlan(1, 2, q.shape[2]).to_dense(), ctx.scale)[0]
    sparse = masked_attention(q, k, v, plan.to_dense(), ctx.scale)[0]
    assert torch.allclose(out[:, :2], dense[:, :2], atol=1e-5)   # the lossy group ran dense
    assert torch.allclose(out[:, 2:], sparse[:, 2:], atol=1e-5)  # the other ran its plan
    assert not torch.allclose(dense[:, :2], sparse[:, :2], atol=1e-2)  # and the difference is real
    kinds = [(type(p).__name__, offset, heads) for p, offset, heads in seen]
    assert kinds == [("DensePlan", 0, 2), ("StripePlan", 2, 2)]
    assert "max_error 0.5" in seen[0][0].reason


@pytest.mark.parametrize("max_error", [0.0, 1e9])
def test_guard_at_its_extremes(max_error):
    q, k, v = _inputs_far_key(batch=2)
    plan = random_stripe_plan(2, 2, q.shape[2], 32, 4, 16, fraction=0.3, seed=5)
    ctx = AttentionContext.for_inputs(q, k)
    out, lse = sparse_attention(q, k, v, _FixedPlan(plan), ctx, guard=ErrorGuard(max_error, rows=32),
                                return_lse=True)
    expected_plan = plan if max_error > 0 else DensePlan(2, 2, q.shape[2])  # 0: every lossy group is dense
    expected, expected_lse = masked_attention(q, k, v, expected_plan.to_dense(), ctx.scale)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert torch.allclose(out, expected, atol=1e-5) and torch.allclose(lse, expected_lse, atol=1e-5)


def test_a_complete_plan_has_no_error():
    q, k, v = _inputs_far_key()
    plan = random_stripe_plan(1, 2, q.shape[2], 32, 4, 16, fraction=1.0)
    ctx = AttentionContext.for_inputs(q, k)
    out, _ = sparse_attention(q, k, v, _FixedPlan(plan), ctx)
    assert torch.all(ErrorGuard(0.0, rows=8).kv_head_errors(q, k, v, out, ctx.scale) < 1e-5)


def test_block_plans_are_guarded_too():
    q, k, v = _inputs_far_key()
    n = q.shape[2]
    offsets = torch.arange(2 * 4 + 1, dtype=torch.int64)
    diagonal = BlockPlan(1, 2, n, 32, offsets, torch.arange(4, dtype=torch.int32).repeat(2))
    ctx = AttentionContext.for_inputs(q, k)
    seen = []
    sparse_attention(q, k, v, _FixedPlan(diagonal), ctx, guard=ErrorGuard(0.5, rows=16),
                     on_plan=lambda p, c: seen.append(type(p).__name__))
    assert seen == ["DensePlan", "BlockPlan"]


def test_policy_guard_key():
    policy = load_policy({"default": {"pattern": "anchor"}, "guard": {"max_error": 0.3, "rows": 32}})
    assert policy.guard == ErrorGuard(0.3, 32)
    assert "guard" in policy.describe()
    assert load_policy({"default": {"pattern": "anchor"}, "guard": {}}).guard == ErrorGuard()
    assert load_policy({"default": {"pattern": "anchor"}}).guard is None
    for bad, key in [({"max_error": -1}, "guard.max_error"), ({"max_error": "big"}, "guard.max_error"),
                     ({"rows": 0}, "guard.rows"), ({"rows": True}, "guard.rows"), ({"error": 0.5}, "guard.error"),
                     ([0.5], "guard")]:
        with pytest.raises(PolicyError, match=key.replace(".", r"\.")):
            load_policy({"default": {"pattern": "anchor"}, "guard": bad})


def test_memory_keeps_a_rejection_for_remember_calls_per_layer_head_and_length_scale():
    memory = GuardMemory(remember=2)
    memory.record(3, range(4, 6), 1000, [True, False])
    assert len(memory) == 1
    assert memory.known_dense(3, range(4, 6), 1000) == [True, False]
    assert memory.known_dense(3, range(4, 6), 900) == [True, False]  # same power-of-two bucket, second call
    assert memory.known_dense(3, range(4, 6), 1000) == [False, False]  # used up: tested again
    memory.record(3, range(4, 6), 1000, [True, False])
    assert memory.known_dense(2, range(4, 6), 1000) == [False, False]  # another layer
    assert memory.known_dense(3, range(4, 6), 4000) == [False, False]  # another length scale
    memory.record(None, range(2), 1000, [True, True])  # no layer index: never remembered
    assert memory.known_dense(None, range(2), 1000) == [False, False]
    GuardMemory(remember=0).record(1, range(2), 10, [True, True])
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="remember"):
            GuardMemory(remember=bad)


class _WindowsOnly(Identifier):
    """A windows-only plan for whatever heads it is given; counts the KV heads of each identification."""

    def __init__(self):
        self.kv_heads = []

    def identify(self, q, k, ctx):
        self.kv_heads.append(k.shape[1])
        return _windows_only_plan(q.shape[0], k.shape[1], q.shape[2])


def test_a_remembered_group_runs_dense_without_identification_and_the_others_as_before():
    q, k, v = _inputs_far_key()
    identifier = _WindowsOnly()
    guard, memory = ErrorGuard(max_error=0.5, rows=16, remember=1), GuardMemory(1)
    ctx = AttentionContext.for_inputs(q, k, layer_idx=0)
    outputs, seen = [], []
    for _ in range(3):
        seen.append([])
        outputs.append(sparse_attention(q, k, v, identifier, ctx, guard=guard, guard_memory=memory, return_lse=True,
                                        on_plan=lambda p, c: seen[-1].append(
                                            (type(p).__name__, c.head_offset, getattr(p, "reason", "")))))
    assert identifier.kv_heads == [2, 1, 2]  # the second call identified KV group 1 alone
    tested = [("DensePlan", 0, guard.reason()), ("StripePlan", 2, "")]
    assert seen == [tested, [("DensePlan", 0, guard.remembered_reason()), ("StripePlan", 2, "")], tested]
    for out, lse in outputs[1:]:
        assert torch.allclose(out, outputs[0][0], atol=1e-6) and torch.allclose(lse, outputs[0][1], atol=1e-6)


def test_policy_guard_remember_key():
    policy = load_policy({"default": {"pattern": "anchor"}, "guard": {"max_error": 0.3, "remember": 8}})
    assert policy.guard == ErrorGuard(0.3, remember=8) and "for 8 calls" in policy.describe()
    for bad in (-1, "many", True):
        with pytest.raises(PolicyError, match=r"guard\.remember"):
            load_policy({"default": {"pattern": "anchor"}, "guard": {"remember": bad}})
