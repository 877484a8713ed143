"""sparse_attention: executor choice, and heads run in memory-bounded chunks that change no result."""

from __future__ import annotations

import dataclasses
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels run on the CPU

import warnings

import pytest
import torch

import sparse_prefill.patterns.anchor as anchor_pattern
from sparse_prefill.dispatch import (
    NoCapableExecutorError,
    _head_chunks,
    default_plan_budget,
    select_executor,
    sparse_attention,
)
from sparse_prefill.interfaces import AttentionContext, PlanBudgetExceeded, output_like
from sparse_prefill.kernels.executors import DenseSDPAExecutor, ReferenceExecutor, TritonStripeExecutor
from sparse_prefill.kernels.stripe_attention import stripe_attention
from sparse_prefill.patterns.anchor import ANCHOR
from sparse_prefill.patterns.dense import DenseIdentifier
from sparse_prefill.plan import DensePlan, StripePlan, plan_nbytes

# Always a StripePlan, one key list per query head (so a KV group can be split by query head).
ANCHOR_PARAMS = dict(theta=4.0, block=16, sink=16, local=16, dense_tail=0, dense_above=1.0, share_kv_heads=False)


def qkv(hq: int = 8, hkv: int = 4, n: int = 150, d: int = 32, dtype=torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, h, n, d, generator=gen).to(dtype) for h in (hq, hkv, hkv))


class Recorder:
    """on_plan callback that keeps each chunk's context, plan and plan size."""

    def __init__(self) -> None:
        self.contexts: list[AttentionContext] = []
        self.plans: list = []
        self.nbytes: list[int] = []

    def __call__(self, plan, ctx: AttentionContext) -> None:
        self.contexts.append(ctx)
        self.plans.append(plan)
        self.nbytes.append(plan_nbytes(plan))


@pytest.mark.parametrize("budget", [0, 10_000, None])
def test_chunked_heads_give_the_unchunked_result(budget):
    q, k, v = qkv()
    identifier = ANCHOR.build(**ANCHOR_PARAMS)
    ctx = AttentionContext.for_inputs(q, k, head_offset=8)
    unchunked = Recorder()
    whole, whole_lse = sparse_attention(q, k, v, identifier, ctx, executor=ReferenceExecutor(), return_lse=True,
                                        max_plan_bytes=2**62, on_plan=unchunked)
    recorder = Recorder()
    out, lse = sparse_attention(q, k, v, identifier, ctx, executor=ReferenceExecutor(), return_lse=True,
                                max_plan_bytes=budget, on_plan=recorder)
    # The same keys for every head, so the same answer up to float32 sums taken over other shapes (the reference's
    # products differ in padding and batch with the chunk; twice in many runs that moved an output by 7e-5).
    assert len(unchunked.plans) == 1
    chunk_masks = torch.cat([plan.to_dense() for plan in recorder.plans], dim=1)
    assert torch.equal(chunk_masks, unchunked.plans[0].to_dense())
    torch.testing.assert_close(out, whole, atol=2e-4, rtol=0)
    torch.testing.assert_close(lse, whole_lse, atol=2e-4, rtol=0)
    # The chunks cover every head once, in order, with their global offsets and whole KV groups.
    offsets = [c.head_offset for c in recorder.contexts]
    heads = [c.num_q_heads for c in recorder.contexts]
    assert offsets == [8 + sum(heads[:i]) for i in range(len(heads))] and sum(heads) == 8
    assert all(c.num_kv_heads == 1 or c.num_q_heads == 2 * c.num_kv_heads for c in recorder.contexts)
    if budget == 0:
        assert heads == [1] * 8  # nothing fits: one query head at a time (each has its own key list)


def test_chunks_fit_the_budget_and_an_unbounded_call_is_one_plan(caplog):
    q, k, v = qkv(hq=8, hkv=8)
    identifier = ANCHOR.build(**ANCHOR_PARAMS)
    per_head = Recorder()
    sparse_attention(q, k, v, identifier, executor=ReferenceExecutor(), max_plan_bytes=0, on_plan=per_head)
    assert [c.num_q_heads for c in per_head.contexts] == [1] * 8
    budget = 3 * max(per_head.nbytes)
    recorder = Recorder()
    caplog.set_level("DEBUG", logger="sparse_prefill")
    caplog.clear()
    sparse_attention(q, k, v, identifier, executor=ReferenceExecutor(), max_plan_bytes=budget, on_plan=recorder)
    assert 1 < len(recorder.contexts) < 8 and all(b <= budget for b in recorder.nbytes)
    # Say what ran: the split is told, with the number of calls it made.
    assert [r.name for r in caplog.records] == ["sparse_prefill.dispatch"]
    assert f"run as {len(recorder.contexts)} calls" in caplog.records[0].getMessage()
    caplog.clear()
    whole = Recorder()
    sparse_attention(q, k, v, identifier, executor=ReferenceExecutor(), max_plan_bytes=2**62, on_plan=whole)
    assert [c.num_kv_heads for c in whole.contexts] == [8] and not caplog.records


def chunks_for(kv_bytes, query_bytes, group, budget):
    return [(q.start, q.stop, kv.start, kv.stop) for q, kv in
            _head_chunks(PlanBudgetExceeded(kv_bytes, budget, query_bytes), group, budget)]


def test_whole_kv_groups_are_packed_greedily_in_order():
    # 2 query heads per KV head; no per-query-head sizes: a group over budget runs alone.
    assert chunks_for([5, 5, 5, 20, 1], None, 2, 10) == [(0, 4, 0, 2), (4, 6, 2, 3), (6, 8, 3, 4), (8, 10, 4, None)]
    assert chunks_for([1, 1, 1], None, 2, 10) == [(0, 6, 0, None)]


def test_a_group_over_budget_splits_into_its_query_heads_when_allowed():
    query = [2, 2, 8, 8, 9, 9, 1, 1]  # 4 KV heads x 2 query heads
    kv = [4, 16, 18, 2]
    assert chunks_for(kv, query, 2, 10) == [(0, 2, 0, 1), (2, 3, 1, 2), (3, 4, 1, 2), (4, 5, 2, 3), (5, 6, 2, 3),
                                            (6, 8, 3, None)]


def test_an_identifier_that_ignores_the_budget_runs_in_one_call():
    q, k, v = qkv()
    recorder = Recorder()
    sparse_attention(q, k, v, DenseIdentifier(), executor=DenseSDPAExecutor(), max_plan_bytes=0, on_plan=recorder)
    assert len(recorder.contexts) == 1


def test_default_budget_is_a_fifth_of_the_inputs():
    q, k, v = qkv(dtype=torch.bfloat16)
    assert default_plan_budget(q, k, v) == int(0.2 * (q.nbytes + k.nbytes + v.nbytes))


def test_a_named_executor_that_cannot_run_says_why():
    q, k, v = qkv()
    with pytest.raises(NoCapableExecutorError, match="dense-sdpa cannot run.*StripePlan"):
        sparse_attention(q, k, v, ANCHOR.build(**ANCHOR_PARAMS), executor=DenseSDPAExecutor())


@pytest.mark.parametrize("executor, identifier", [
    (ReferenceExecutor(), ANCHOR.build(**ANCHOR_PARAMS)),
    (DenseSDPAExecutor(), DenseIdentifier()),
], ids=["reference", "dense-sdpa"])
def test_executors_write_into_a_strided_out(executor, identifier):
    q, k, v = qkv()
    ctx = AttentionContext.for_inputs(q, k)
    plan = identifier.identify(q, k, ctx)
    expected = executor(q, k, v, plan, ctx)[0]
    big = torch.zeros(2, 12, 150, 32)
    result = executor(q, k, v, plan, ctx, out=big[:, 2:10])[0]
    assert result.data_ptr() == big[:, 2:10].data_ptr()
    torch.testing.assert_close(big[:, 2:10], expected, atol=1e-6, rtol=0)
    assert not big[:, :2].any() and not big[:, 10:].any()


def test_triton_stripe_kernel_writes_into_a_strided_out():
    q, k, v = qkv(n=100, d=64, dtype=torch.float16)
    plan = ANCHOR.build(**ANCHOR_PARAMS).identify(q, k, AttentionContext.for_inputs(q, k))
    expected = stripe_attention(q, k, v, plan, 0.125)[0]
    big = torch.zeros(2, 12, 100, 64, dtype=torch.float16)
    stripe_attention(q, k, v, plan, 0.125, out=big[:, 4:12])
    torch.testing.assert_close(big[:, 4:12], expected, atol=0, rtol=0)
    assert not big[:, :4].any()
    with pytest.raises(ValueError, match="out must match q"):
        stripe_attention(q, k, v, plan, 0.125, out=big[:, 4:12].float())


def test_triton_executor_accepts_out_through_dispatch():
    q, k, v = qkv(n=100, d=64, dtype=torch.float16)
    identifier = ANCHOR.build(**ANCHOR_PARAMS)
    chunked = sparse_attention(q, k, v, identifier, executor=TritonStripeExecutor(), max_plan_bytes=0)[0]
    whole = stripe_attention(q, k, v, identifier.identify(q, k, AttentionContext.for_inputs(q, k)), 64**-0.5)[0]
    torch.testing.assert_close(chunked, whole, atol=0, rtol=0)


def test_shared_key_lists_are_never_split_inside_a_kv_group():
    q, k, v = qkv()
    identifier = ANCHOR.build(**{**ANCHOR_PARAMS, "share_kv_heads": True})  # one list per KV group: a union
    whole = sparse_attention(q, k, v, identifier, executor=ReferenceExecutor(), max_plan_bytes=2**62)[0]
    recorder = Recorder()
    out = sparse_attention(q, k, v, identifier, executor=ReferenceExecutor(), max_plan_bytes=0, on_plan=recorder)[0]
    assert [(c.num_q_heads, c.num_kv_heads) for c in recorder.contexts] == [(2, 1)] * 4
    torch.testing.assert_close(out, whole, atol=1e-6, rtol=0)


@pytest.mark.parametrize("budget", [-1, 1.5, "1GB", True], ids=repr)
def test_a_bad_budget_says_what_is_allowed(budget):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"max_plan_bytes\) must be None \(no limit\) or an int >= 0"):
        sparse_attention(q, k, v, ANCHOR.build(**ANCHOR_PARAMS), max_plan_bytes=budget)


def test_chunks_keep_the_whole_calls_sparse_decision():
    # Head 1 is denser than the whole (dense_above between the two): one call gives a StripePlan,
    # and its chunks must not turn head 1 into a DensePlan (a different answer).
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 192, 64, generator=g) for _ in range(3))
    q[:, 1] *= 4.0
    identifier = ANCHOR.build(theta=2.0, block=16, group_blocks=1, sink=16, local=16, share_kv_heads=False,
                              dense_tail=0, dense_above=0.48)
    kinds = []
    whole = sparse_attention(q, k, v, identifier, max_plan_bytes=2**62, on_plan=lambda p, c: kinds.append(type(p)))
    chunked = sparse_attention(q, k, v, identifier, max_plan_bytes=0, on_plan=lambda p, c: kinds.append(type(p)))
    assert len(set(kinds)) == 1 and len(kinds) == 3  # one plan, then one per head, all of one kind
    torch.testing.assert_close(chunked[0], whole[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("dense_above", [1.0, 1e-6], ids=["held", "too-dense"])
def test_a_pending_plan_is_launched_resolved_and_reported_as_what_ran(dense_above):
    """The identifier's pending plan runs under its verdict on the Triton executor; on_plan sees the resolved
    plan (its key list cut to its size, or the DensePlan that then ran), and the output is that plan's."""
    q, k, v = qkv()
    identifier = ANCHOR.build(**{**ANCHOR_PARAMS, "dense_above": dense_above})
    seen = []
    out, _ = sparse_attention(q, k, v, identifier, on_plan=lambda plan, ctx: seen.append(plan))
    (plan,) = seen
    if dense_above < 1:
        assert isinstance(plan, DensePlan)
        expected = DenseSDPAExecutor()(q, k, v, plan, AttentionContext.for_inputs(q, k))[0]
    else:
        assert isinstance(plan, StripePlan) and plan.indices.numel() == int(plan.offsets[-1])
        plan.validate()
        expected = ReferenceExecutor()(q, k, v, plan, AttentionContext.for_inputs(q, k))[0]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_chunked_calls_accept_inputs_whose_head_dim_is_not_innermost():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 64, 64, generator=g).half().transpose(-1, -2) for _ in range(3))
    identifier = ANCHOR.build(theta=4.0, block=16, sink=16, local=16, dense_tail=0, dense_above=1.0,
                              share_kv_heads=False)
    whole = sparse_attention(q, k, v, identifier, max_plan_bytes=2**62)[0]
    torch.testing.assert_close(sparse_attention(q, k, v, identifier, max_plan_bytes=0)[0], whole, atol=0, rtol=0)


def test_the_reference_executor_refuses_an_invalid_plan():
    from sparse_prefill.interfaces import Identifier
    from sparse_prefill.plan import StripePlan

    class FutureKey(Identifier):  # rows 16-31 "select" key 35, which lies in their future
        def identify(self, q, k, ctx):
            return StripePlan(1, 1, 40, 16, 4, 8, torch.tensor([0, 0, 1, 1]), torch.tensor([35], dtype=torch.int32))

    q, k, v = torch.randn(1, 2, 40, 16), torch.randn(1, 1, 40, 16), torch.randn(1, 1, 40, 16)
    with pytest.raises(ValueError, match="StripePlan.indices"):
        sparse_attention(q, k, v, FutureKey(), executor=ReferenceExecutor())


def test_decreasing_offsets_are_invalid_even_when_nothing_is_selected():
    from sparse_prefill.plan import BlockPlan, StripePlan

    with pytest.raises(ValueError, match="non-decreasing"):
        StripePlan(1, 1, 40, 16, 4, 8, torch.tensor([0, 2, 0, 0]), torch.zeros(0, dtype=torch.int32)).validate()
    with pytest.raises(ValueError, match="non-decreasing"):
        BlockPlan(1, 1, 40, 16, torch.tensor([0, 2, 1, 3]), torch.tensor([0, 0, 1], dtype=torch.int32)).validate()


@pytest.mark.parametrize("params, problem", [
    ({"sink": -4}, ">= 0"), ({"local": "16"}, "expected int"), ({"sinks": 4}, "no parameter"),
])
def test_pattern_build_checks_parameters_as_a_policy_does(params, problem):
    from sparse_prefill.registry import get_pattern

    with pytest.raises(ValueError, match=problem):
        get_pattern("streaming").build(**params)


def test_dense_fallback_must_be_a_bool():
    with pytest.raises(ValueError, match="dense_fallback"):
        AttentionContext(scale=1.0, num_q_heads=2, num_kv_heads=1, seq_len=8, dense_fallback="no")


# ---------------------------------------------------------------------------------------------
# Non-finite rows end to end: the other rows keep their answer, NaN stays where dense attention has it
# ---------------------------------------------------------------------------------------------

PATHS = {"reference": ReferenceExecutor(), "triton": TritonStripeExecutor()}


def _on_path(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reference path identifies with the PyTorch reference (as off CUDA without the interpreter)."""
    if name == "reference":
        monkeypatch.setattr(anchor_pattern, "triton_can_run", lambda device: False)


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # numpy, interpreting the NaN row's max
@pytest.mark.parametrize("name", PATHS)
def test_a_nan_query_row_leaves_the_other_rows_alone(name, monkeypatch):
    _on_path(name, monkeypatch)
    q, k, v = qkv(hq=4, hkv=2, n=130, d=64)
    # theta 1e30 keeps every candidate: the other rows must then equal dense attention.
    identifier = ANCHOR.build(**{**ANCHOR_PARAMS, "theta": 1e30, "block": 32})
    clean = sparse_attention(q, k, v, identifier, executor=PATHS[name])[0]
    q[1, 3, 77] = float("nan")  # one row of a 32-row pooled block
    out = sparse_attention(q, k, v, identifier, executor=PATHS[name])[0]
    others = torch.ones(out.shape[:3], dtype=torch.bool)
    others[1, 3, 77] = False
    assert out[1, 3, 77].isnan().all() and not out[others].isnan().any()
    assert torch.equal(out[others], clean[others])
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out[others], dense[others], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", PATHS)
def test_a_nan_key_reaches_every_later_row_as_in_dense_attention(name, monkeypatch):
    _on_path(name, monkeypatch)
    q, k, v = qkv(hq=4, hkv=2, n=130, d=64)
    identifier = ANCHOR.build(**{**ANCHOR_PARAMS, "theta": 2.0, "share_kv_heads": True})  # a sparse selection
    clean = sparse_attention(q, k, v, identifier, executor=PATHS[name])[0]
    k[0, 1, 20] = float("nan")  # a candidate of every group from row 48 on, selected or not by its score
    out = sparse_attention(q, k, v, identifier, executor=PATHS[name])[0]
    rows = torch.arange(130)
    later = torch.zeros(out.shape[:3], dtype=torch.bool)
    later[0, 2:] = rows >= 20  # query heads 2-3 read KV head 1
    assert torch.equal(out.isnan().any(dim=-1), later)  # dense attention's NaN rows, no more, no fewer
    assert torch.equal(out[~later], clean[~later])


# ---------------------------------------------------------------------------------------------
# Inputs the Triton kernels cannot take run on the references, never an error mid-generation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("head_dim, dtype", [(32, torch.float32), (8, torch.float32), (64, torch.float64)], ids=str)
def test_inputs_the_triton_kernels_cannot_take_run_on_the_references(head_dim, dtype, monkeypatch):
    monkeypatch.setattr(anchor_pattern, "_WARNED", set())
    q, k, v = qkv(d=head_dim, dtype=dtype)
    identifier = ANCHOR.build(**ANCHOR_PARAMS)
    ctx = AttentionContext.for_inputs(q, k)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the identifier's fallback warning (tested in test_anchor_identifier)
        out = sparse_attention(q, k, v, identifier)[0]
        plan = identifier.identify(q, k, ctx)
    assert select_executor(q, plan).name == "reference"
    reasons = TritonStripeExecutor().not_supported_reasons(q, plan)
    assert reasons and all("head dim" in r or "dtype" in r for r in reasons)
    assert out.dtype == dtype
    torch.testing.assert_close(out, ReferenceExecutor()(q, k, v, plan, ctx)[0], atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------
# Gradients: kept by executors with a backward, refused (never dropped) by the Triton kernel
# ---------------------------------------------------------------------------------------------


def _leaves(n: int = 100, d: int = 64):
    return tuple(t.requires_grad_() for t in qkv(hq=4, hkv=2, n=n, d=d))


def test_the_triton_path_refuses_inputs_that_require_grad():
    q, k, v = _leaves()
    identifier = ANCHOR.build(**ANCHOR_PARAMS)
    for executor in (None, TritonStripeExecutor()):
        with pytest.raises(NoCapableExecutorError, match=r"triton-stripe has no backward.*torch\.inference_mode\(\)"
                                                          r".*executor=sparse_prefill\.kernels\.executors\.ReferenceExecutor\(\)"):
            sparse_attention(q, k, v, identifier, executor=executor)
    with torch.inference_mode():
        assert sparse_attention(q, k, v, identifier)[0].shape == q.shape
    with torch.no_grad():
        assert sparse_attention(q, k, v, identifier)[0].shape == q.shape


@pytest.mark.parametrize("budget", [None, 0], ids=["one-plan", "head-chunks"])
def test_the_reference_path_keeps_the_graph(budget):
    q, k, v = _leaves()
    identifier = ANCHOR.build(**{**ANCHOR_PARAMS, "theta": 1e30})  # every key: the gradients are dense attention's
    out, lse = sparse_attention(q, k, v, identifier, executor=ReferenceExecutor(), return_lse=True,
                                max_plan_bytes=budget)
    assert out.requires_grad and lse.requires_grad
    grads = torch.autograd.grad((out * out.detach().sin()).sum(), (q, k, v))
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    expected = torch.autograd.grad((dense * dense.detach().sin()).sum(), (q, k, v))
    for grad, want in zip(grads, expected):
        torch.testing.assert_close(grad, want, atol=1e-5, rtol=1e-4)


def test_the_dense_sdpa_path_keeps_the_graph():
    q, k, v = _leaves()
    out = sparse_attention(q, k, v, DenseIdentifier())[0]
    out.sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))


def test_a_pending_plan_over_the_budget_is_freed_before_the_chunks_identify():
    """A pending plan's key buffer may take the whole budget: the heads' chunks must not find it still alive."""
    import weakref

    from sparse_prefill.interfaces import Identifier
    from sparse_prefill.plan import PendingPlan

    q, k, v = qkv()
    buffers: list[weakref.ref] = []
    alive_during_chunks: list[bool] = []

    class OverBudgetWhenDeferred(Identifier):  # a pending plan that resolves over the budget, then chunk plans
        def identify(self, q, k, ctx):
            plan = ANCHOR.build(**ANCHOR_PARAMS).identify(q, k, dataclasses.replace(ctx, defer_sizing=False))
            if not ctx.defer_sizing:
                alive_during_chunks.append(buffers[0]() is not None)
                return plan
            buffer = torch.empty(1 << 16, dtype=torch.int32)
            buffers.append(weakref.ref(buffer))

            def resolve():
                raise PlanBudgetExceeded([1] * k.shape[1], 0)

            return PendingPlan(dataclasses.replace(plan, indices=buffer), torch.zeros(1, dtype=torch.int32), resolve)

    out, _ = sparse_attention(q, k, v, OverBudgetWhenDeferred(), executor=ReferenceExecutor())
    assert alive_during_chunks and not any(alive_during_chunks)
    assert torch.isfinite(out).all()


def test_output_like_keeps_a_models_layout_and_gives_executors_a_unit_stride_head_dim() -> None:
    projected = torch.randn(2, 9, 4, 8).transpose(1, 2)  # a model's [B, N, H, D] projection seen as [B, H, N, D]
    out = output_like(projected)
    assert out.shape == projected.shape and out.stride() == projected.stride() and out.transpose(1, 2).is_contiguous()
    head_dim_outer = torch.randn(2, 4, 8, 9).transpose(-1, -2)  # the head dim not innermost: contiguous instead
    assert output_like(head_dim_outer).is_contiguous()
    sliced = torch.randn(2, 6, 9, 8)[:, 1:5]  # not dense: contiguous, with q's dtype and device
    made = output_like(sliced.to(torch.bfloat16))
    assert made.is_contiguous() and made.dtype == torch.bfloat16 and made.shape == sliced.shape
