"""Stripe executors: PyTorch references vs dense masked attention, Triton kernel vs reference.

The references are checked against softmax over ``plan.to_dense()`` (small N only); the Triton
kernel, interpreted on the CPU unless a GPU run sets TRITON_INTERPRET=0, against the stripe
reference on the same low-precision inputs. Tolerances per dtype live in ``kernel_checks.TOLERANCES``.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels run on the CPU

import dataclasses
import re
from dataclasses import dataclass

import pytest
import torch

import sparse_prefill.kernels.stripe_attention as stripe_module
from kernel_checks import DEVICE, REFERENCE_TOLERANCE, TOLERANCES, needs_kernel, random_qkv
from kernel_checks import assert_close as _assert_close
from plan_factories import full_stripe_plan, masked_attention, random_block_plan, random_stripe_plan
from sparse_prefill.kernels.attention_tiles import tile_slots
from sparse_prefill.kernels.reference import (
    block_attention_reference,
    dense_attention_reference,
    stripe_attention_reference,
)
from sparse_prefill.kernels.stripe_attention import STRIPE_HEAD_DIMS, stripe_attention
from sparse_prefill.plan import StripePlan


@dataclass(frozen=True)
class Case:
    batch: int
    num_q: int
    num_kv: int
    seq_len: int
    head_dim: int
    group_rows: int
    sink: int
    local: int
    shared: bool  # plan_heads == num_kv (one list per GQA group) instead of num_q
    dtype: torch.dtype = torch.float32
    fraction: float = 0.3

    @property
    def plan_heads(self) -> int:
        return self.num_kv if self.shared else self.num_q

    def id(self) -> str:
        heads = "kv" if self.shared else "q"
        dtype = str(self.dtype).removeprefix("torch.")
        return (
            f"b{self.batch}-q{self.num_q}kv{self.num_kv}-n{self.seq_len}-d{self.head_dim}-g{self.group_rows}"
            f"-sink{self.sink}-local{self.local}-plan_{heads}-{dtype}"
        )


def _plan(case: Case, seed: int, device: str) -> StripePlan:
    return random_stripe_plan(
        case.batch, case.plan_heads, case.seq_len, case.group_rows, case.sink, case.local,
        fraction=case.fraction, seed=seed, device=device,
    )


# ---------------------------------------------------------------------------------------------
# (a) References against dense masked attention
# ---------------------------------------------------------------------------------------------

REFERENCE_CASES = [
    Case(1, 1, 1, 1, 16, 16, 0, 0, shared=False),
    Case(2, 4, 2, 50, 16, 16, 4, 8, shared=False),
    Case(1, 4, 1, 77, 8, 16, 0, 0, shared=True),
    Case(2, 6, 2, 90, 8, 32, 5, 20, shared=True, fraction=0.6),
]


@pytest.mark.parametrize("case", REFERENCE_CASES, ids=Case.id)
def test_stripe_reference_matches_dense_mask(case: Case) -> None:
    q, k, v = random_qkv(case, seed=1, device="cpu")
    plan = _plan(case, seed=2, device="cpu")
    out, lse = stripe_attention_reference(q, k, v, plan, 0.3, return_lse=True)
    expected_out, expected_lse = masked_attention(q, k, v, plan.to_dense(), 0.3)
    _assert_close(out, expected_out, **REFERENCE_TOLERANCE, what="out")
    _assert_close(lse, expected_lse, **REFERENCE_TOLERANCE, what="lse")


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("case", REFERENCE_CASES, ids=Case.id)
def test_block_reference_matches_dense_mask(case: Case, block_size: int) -> None:
    q, k, v = random_qkv(case, seed=3, device="cpu")
    plan = random_block_plan(case.batch, case.plan_heads, case.seq_len, block_size, seed=4)
    out, lse = block_attention_reference(q, k, v, plan, 0.3, return_lse=True)
    expected_out, expected_lse = masked_attention(q, k, v, plan.to_dense(), 0.3)
    _assert_close(out, expected_out, **REFERENCE_TOLERANCE, what="out")
    _assert_close(lse, expected_lse, **REFERENCE_TOLERANCE, what="lse")


@pytest.mark.parametrize("seq_len", [1, 300, 600])  # 600 spans several dense chunks
def test_dense_reference_matches_causal_softmax(seq_len: int) -> None:
    case = Case(1, 4, 2, seq_len, 16, 16, 0, 0, shared=True)
    q, k, v = random_qkv(case, seed=5, device="cpu")
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril().expand(1, 2, -1, -1)
    out, lse = dense_attention_reference(q, k, v, 0.25, return_lse=True)
    expected_out, expected_lse = masked_attention(q, k, v, causal, 0.25)
    _assert_close(out, expected_out, **REFERENCE_TOLERANCE, what="out")
    _assert_close(lse, expected_lse, **REFERENCE_TOLERANCE, what="lse")


def test_reference_returns_input_dtype_and_no_lse_by_default() -> None:
    case = Case(1, 2, 1, 20, 16, 16, 2, 4, shared=True, dtype=torch.bfloat16)
    q, k, v = random_qkv(case, seed=6, device="cpu")
    out, lse = stripe_attention_reference(q, k, v, _plan(case, seed=7, device="cpu"), 0.25)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape and lse is None


# ---------------------------------------------------------------------------------------------
# (b, d, f) Triton kernel against the reference: output, lse, no NaN
# ---------------------------------------------------------------------------------------------

KERNEL_CASES = [
    Case(1, 2, 1, 1, 64, 16, 0, 0, shared=False),  # a single row
    Case(2, 2, 2, 50, 64, 16, 4, 16, shared=True, dtype=torch.float16),  # GQA 1, batch 2
    Case(1, 4, 1, 200, 96, 32, 16, 32, shared=True, dtype=torch.bfloat16),  # GQA 4 stacked, padded head dim
    Case(1, 4, 2, 333, 128, 48, 8, 40, shared=False, dtype=torch.float16),  # a plan per query head
    Case(1, 8, 2, 333, 64, 64, 0, 64, shared=True),  # GQA 4, two KV heads, no sink
    Case(1, 4, 2, 200, 64, 16, 0, 0, shared=True, dtype=torch.bfloat16),  # no windows but the own group
    Case(1, 2, 1, 100, 256, 32, 16, 16, shared=True, dtype=torch.float16),  # head dim 256
    Case(1, 6, 2, 120, 64, 32, 3, 17, shared=True, dtype=torch.float16),  # GQA 3: 96 slots, tiles of 32
    Case(1, 7, 1, 300, 64, 128, 8, 40, shared=True, dtype=torch.bfloat16),  # GQA 7: 7 whole tiles per group
    Case(1, 12, 2, 200, 64, 48, 0, 30, shared=True),  # GQA 6: tiles end mid-row, a partial last tile
    Case(1, 16, 1, 60, 64, 32, 4, 8, shared=True),  # GQA 16: 8 rows x 16 heads per tile
    Case(1, 2, 1, 100, 64, 24, 5, 30, shared=True),  # group_rows not a multiple of the row tile
    Case(1, 2, 2, 90, 64, 16, 10, 1000, shared=False, dtype=torch.float16),  # local window covers all
]


@needs_kernel
@pytest.mark.parametrize("case", KERNEL_CASES, ids=Case.id)
def test_kernel_matches_reference(case: Case) -> None:
    q, k, v = random_qkv(case, seed=11, device=DEVICE)
    plan = _plan(case, seed=12, device=DEVICE)
    scale = case.head_dim**-0.5
    out, lse = stripe_attention(q, k, v, plan, scale, return_lse=True)
    expected_out, expected_lse = stripe_attention_reference(q, k, v, plan, scale, return_lse=True)
    tol = TOLERANCES[case.dtype]
    assert out.dtype == q.dtype and out.shape == q.shape and lse.shape == q.shape[:3] and lse.dtype == torch.float32
    _assert_close(out, expected_out, tol["atol"], tol["rtol"], what="out")
    _assert_close(lse, expected_lse, tol["lse_atol"], 0.0, what="lse")


@needs_kernel
def test_kernel_without_lse_and_with_stridedrandom_qkv() -> None:
    """[B, N, H, D] storage transposed to [B, H, N, D], and a head dim with stride 2."""
    case = Case(1, 4, 2, 70, 64, 16, 4, 16, shared=True)
    q, k, v = random_qkv(case, seed=13, device=DEVICE)
    q_strided = q.transpose(1, 2).contiguous().transpose(1, 2)
    k_strided = torch.stack([k, torch.zeros_like(k)], dim=-1).flatten(-2)[..., ::2]
    plan = _plan(case, seed=14, device=DEVICE)
    out, lse = stripe_attention(q_strided, k_strided, v, plan, 0.125)
    expected, _ = stripe_attention_reference(q, k, v, plan, 0.125)
    assert lse is None
    _assert_close(out, expected, TOLERANCES[torch.float32]["atol"], TOLERANCES[torch.float32]["rtol"], what="out")
    # Laid out as q is: a model's transpose of the output back to [B, N, H, D] is then a view, not a copy.
    assert out.stride() == q_strided.stride() and out.transpose(1, 2).is_contiguous()


@needs_kernel
def test_kernel_reads_a_plan_with_strided_csr_tensors() -> None:
    """A plugin's plan may hold views: the kernel reads raw pointers, so it must get dense copies."""
    case = Case(1, 4, 2, 70, 64, 16, 4, 16, shared=True)
    q, k, v = random_qkv(case, seed=15, device=DEVICE)
    plan = _plan(case, seed=16, device=DEVICE)
    spread = lambda x: torch.stack([x, torch.zeros_like(x)], dim=-1).flatten()[::2]  # noqa: E731
    strided = dataclasses.replace(plan, offsets=spread(plan.offsets), indices=spread(plan.indices))
    assert not strided.offsets.is_contiguous() and torch.equal(strided.offsets, plan.offsets)
    out, _ = stripe_attention(q, k, v, strided, 0.125)
    expected, _ = stripe_attention_reference(q, k, v, plan, 0.125)
    _assert_close(out, expected, TOLERANCES[torch.float32]["atol"], TOLERANCES[torch.float32]["rtol"], what="out")


@needs_kernel
def test_a_verdict_of_zero_writes_nothing_and_of_one_runs_the_plan() -> None:
    """A pending plan (its size not yet read on the host) runs under a device verdict: 0 leaves out as it was."""
    case = Case(1, 4, 2, 70, 64, 16, 4, 16, shared=True)
    q, k, v = random_qkv(case, seed=19, device=DEVICE)
    plan = _plan(case, seed=20, device=DEVICE)
    untouched = torch.full_like(q, 7.0)
    stripe_attention(q, k, v, plan, 0.125, out=untouched, verdict=torch.zeros(1, dtype=torch.int32, device=DEVICE))
    assert bool((untouched == 7.0).all())
    ran, _ = stripe_attention(q, k, v, plan, 0.125, verdict=torch.ones(1, dtype=torch.int32, device=DEVICE))
    assert torch.equal(ran, stripe_attention(q, k, v, plan, 0.125)[0])
    with pytest.raises(ValueError, match="verdict must be one int32 element"):
        stripe_attention(q, k, v, plan, 0.125, verdict=torch.ones(1, dtype=torch.int64, device=DEVICE))


@needs_kernel
def test_kernel_refuses_an_out_that_overlaps_itself() -> None:
    case = Case(1, 4, 2, 70, 64, 16, 4, 16, shared=True)
    q, k, v = random_qkv(case, seed=17, device=DEVICE)
    expanded = torch.empty(1, 4, 1, 64, dtype=q.dtype, device=DEVICE).expand(q.shape)
    with pytest.raises(ValueError, match="overlap"):
        stripe_attention(q, k, v, _plan(case, seed=18, device=DEVICE), 0.125, out=expanded)


@needs_kernel
def test_gathered_loop_with_several_whole_tiles_matches_the_reference(monkeypatch) -> None:
    """Segments of several whole tiles plus a partial one: the indices prefetched one tile ahead."""
    import triton  # noqa: PLC0415  (only this test builds a config)

    case = Case(2, 4, 2, 300, 64, 32, 8, 16, shared=False, dtype=torch.float16, fraction=0.6)
    config = triton.Config({"BLOCK_N": 16}, num_warps=4, num_stages=1)
    monkeypatch.setattr(stripe_module._stripe_fwd, "configs", [config])
    q, k, v = random_qkv(case, seed=17, device=DEVICE)
    plan = _plan(case, seed=18, device=DEVICE)
    assert (plan.counts() > 2 * 16).any() and (plan.counts() % 16 != 0).any()
    out, lse = stripe_attention(q, k, v, plan, 0.125, return_lse=True)
    expected, expected_lse = stripe_attention_reference(q, k, v, plan, 0.125, return_lse=True)
    tol = TOLERANCES[case.dtype]
    _assert_close(out, expected, tol["atol"], tol["rtol"], what="out")
    _assert_close(lse, expected_lse, tol["lse_atol"], 0.0, what="lse")


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_kernel_large_scores_stay_finite(dtype: torch.dtype) -> None:
    """Scores in the thousands: the online softmax must rescale without overflow or NaN."""
    case = Case(1, 2, 1, 80, 64, 16, 8, 16, shared=True, dtype=dtype)
    q, k, v = random_qkv(case, seed=15, device=DEVICE)
    plan = _plan(case, seed=16, device=DEVICE)
    out, lse = stripe_attention(q * 20, k * 20, v, plan, 1.0, return_lse=True)
    assert torch.isfinite(out.float()).all() and torch.isfinite(lse).all()


# ---------------------------------------------------------------------------------------------
# (c) A plan that selects every candidate is dense causal attention
# ---------------------------------------------------------------------------------------------

FULL_CASES = [
    Case(1, 4, 2, 150, 64, 32, 8, 32, shared=True),
    Case(1, 2, 1, 97, 128, 16, 0, 0, shared=False, dtype=torch.float16),
]


@needs_kernel
@pytest.mark.parametrize("case", FULL_CASES, ids=Case.id)
def test_full_plan_equals_dense_causal(case: Case) -> None:
    """Windows plus every candidate partition the causal range; tolerance as kernel vs reference."""
    q, k, v = random_qkv(case, seed=17, device=DEVICE)
    plan = full_stripe_plan(case.batch, case.plan_heads, case.seq_len, case.group_rows, case.sink, case.local, DEVICE)
    out, lse = stripe_attention(q, k, v, plan, 0.1, return_lse=True)
    expected_out, expected_lse = dense_attention_reference(q, k, v, 0.1, return_lse=True)
    tol = TOLERANCES[case.dtype]
    _assert_close(out, expected_out, tol["atol"], tol["rtol"], what="out")
    _assert_close(lse, expected_lse, tol["lse_atol"], 0.0, what="lse")
    reference_out, _ = stripe_attention_reference(q, k, v, plan, 0.1)
    _assert_close(reference_out, expected_out, tol["atol"], tol["rtol"], what="reference out")  # both rounded to dtype


# ---------------------------------------------------------------------------------------------
# (e) Validation: every refusal says what it got and what is allowed
# ---------------------------------------------------------------------------------------------

_VALID = Case(1, 4, 2, 32, 64, 16, 2, 4, shared=True)


def _valid_call(device: str | None = DEVICE) -> dict:
    """A call the kernel takes, on ``device`` (DEVICE: where the kernel runs; None: the CPU)."""
    q, k, v = random_qkv(_VALID, seed=0, device=device)
    return {"q": q, "k": k, "v": v, "plan": _plan(_VALID, seed=0, device=device), "scale": 0.125}


def _replace_plan(**changes):
    def mutate(call: dict) -> None:
        call["plan"] = dataclasses.replace(call["plan"], **changes)
    return mutate


def _set(name: str, make):
    def mutate(call: dict) -> None:
        call[name] = make(call)
    return mutate


ERROR_CASES = [
    pytest.param(
        _set("plan", lambda c: random_block_plan(1, 2, 32, 16)), TypeError, "StripePlan, got BlockPlan", id="plan-kind"
    ),
    pytest.param(_set("q", lambda c: c["q"][0]), ValueError, "must be 4-D", id="q-3d"),
    pytest.param(_set("k", lambda c: c["k"].cpu().numpy()), TypeError, "k must be a torch.Tensor", id="k-numpy"),
    pytest.param(_set("v", lambda c: c["v"][:, :1]), ValueError, "k and v must have one shape", id="kv-shapes"),
    pytest.param(_set("q", lambda c: c["q"][:, :3]), ValueError, "Hq=3 and Hkv=2", id="gqa-ratio"),
    pytest.param(_set("q", lambda c: c["q"][:, :, :31]), ValueError, "share non-empty batch, seq_len", id="q-len"),
    pytest.param(_set("v", lambda c: c["v"].half()), TypeError, "share one dtype", id="dtype-mismatch"),
    pytest.param(
        lambda c: c.update({x: c[x].double() for x in "qkv"}), TypeError, "supports dtypes", id="dtype-float64"
    ),
    pytest.param(lambda c: c.update({x: c[x][..., :32] for x in "qkv"}), ValueError, "head dims", id="head-dim-32"),
    # Checked after the device: only where the kernel runs (DEVICE).
    pytest.param(_set("scale", lambda c: float("nan")), ValueError, "scale must be a positive finite", id="scale-nan",
                 marks=needs_kernel),
    pytest.param(_set("scale", lambda c: -1.0), ValueError, "got -1.0", id="scale-negative", marks=needs_kernel),
    pytest.param(_replace_plan(batch=2), ValueError, "batch=2, seq_len=32 but q has batch=1", id="plan-batch",
                 marks=needs_kernel),
    pytest.param(_replace_plan(seq_len=40), ValueError, "seq_len=40", id="plan-seq-len", marks=needs_kernel),
    pytest.param(_replace_plan(plan_heads=1), ValueError, "query heads (4) or the KV heads (2)", id="plan-heads",
                 marks=needs_kernel),
    pytest.param(
        _replace_plan(offsets=torch.zeros(5, dtype=torch.int64, device="meta")),
        ValueError,
        "build the plan on q's device",
        id="plan-device",
        marks=needs_kernel,
    ),
    pytest.param(
        lambda c: _replace_plan(offsets=c["plan"].offsets.int())(c), ValueError, "int64 offsets of length 5",
        id="plan-csr-dtype", marks=needs_kernel,
    ),
]


@pytest.mark.parametrize("mutate, error, message", ERROR_CASES)
def test_kernel_validation_errors(mutate, error: type[Exception], message: str) -> None:
    call = _valid_call()
    mutate(call)
    with pytest.raises(error, match=re.escape(message)):
        stripe_attention(**call)


def test_kernel_refuses_cpu_without_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # triton_can_run reads it at call time
    with pytest.raises(ValueError, match="set TRITON_INTERPRET=1"):
        stripe_attention(**_valid_call("cpu"))


@pytest.mark.parametrize("executor", [stripe_attention_reference, block_attention_reference], ids=lambda f: f.__name__)
def test_references_validate_plan_heads(executor) -> None:
    call = _valid_call("cpu")
    plan = call.pop("plan")
    if executor is block_attention_reference:
        plan = random_block_plan(1, 3, 32, 16)
    else:
        plan = dataclasses.replace(plan, plan_heads=3)
    with pytest.raises(ValueError, match=re.escape("has 3 heads; allowed: the query heads (4) or the KV heads (2)")):
        executor(plan=plan, **call)


def test_kernel_cases_cover_declared_head_dims() -> None:
    assert set(STRIPE_HEAD_DIMS) <= {case.head_dim for case in KERNEL_CASES}


@pytest.mark.parametrize("head_dim", [64, 256])
def test_tiles_are_mma_sized_and_pad_a_unit_by_at_most_an_eighth(head_dim: int) -> None:
    largest = 128 if head_dim <= 128 else 64
    for heads in range(1, 17):
        for unit_rows in (16, 24, 32, 48, 64, 96, 128, 256):
            size = tile_slots(heads, unit_rows, head_dim)
            slots = heads * unit_rows
            padding = -slots % size
            assert size & (size - 1) == 0 and 16 <= size <= largest, (heads, unit_rows, size)
            # The largest tile that pads at most an eighth; 16 (tl.dot's least) where none does.
            assert 8 * padding <= slots or size == 16, (heads, unit_rows, size)
            assert size == largest or 8 * (-slots % (2 * size)) > slots, (heads, unit_rows, size)


# ---------------------------------------------------------------------------------------------
# (g) Non-finite inputs stay where dense attention puts them
# ---------------------------------------------------------------------------------------------

EXECUTORS = {"reference": stripe_attention_reference, "triton": stripe_attention}


@pytest.mark.parametrize("tensor", ["q", "k", "v"])
@pytest.mark.parametrize("name", EXECUTORS)
def test_a_nan_row_reaches_exactly_the_rows_dense_attention_gives_it(name: str, tensor: str) -> None:
    """NaN in q row r: output row r only. NaN in k or v row j: every row the plan lets attend j; a NaN
    k leaves the other rows exactly as they were (a NaN v may reach them through 0 x NaN in P @ V, as
    in torch's SDPA, so only the attending rows are checked)."""
    if name == "triton" and DEVICE is None:
        pytest.skip("needs a CUDA device or TRITON_INTERPRET=1")
    device = "cpu" if name == "reference" else DEVICE
    case = Case(1, 4, 2, 150, 64, 32, 8, 16, shared=True, fraction=0.5)
    q, k, v = random_qkv(case, seed=21, device=device)
    plan = _plan(case, seed=22, device=device)
    clean, clean_lse = EXECUTORS[name](q, k, v, plan, 0.125, return_lse=True)
    poisoned = {"q": q.clone(), "k": k.clone(), "v": v.clone()}
    head, row = (1, 70) if tensor == "q" else (0, 40)
    poisoned[tensor][0, head, row, 5] = float("nan")
    out, lse = EXECUTORS[name](*poisoned.values(), plan, 0.125, return_lse=True)
    nan_rows = out.isnan().any(dim=-1)
    if tensor == "q":
        expected = torch.zeros_like(nan_rows)
        expected[0, head, row] = True
    else:  # query heads 0-1 read KV head 0 through plan head 0
        attends = plan.to_dense()[:, :, :, row].repeat_interleave(2, dim=1).to(device)
        expected = attends & (torch.arange(4, device=device) < 2)[None, :, None]
    assert expected.any()
    if tensor == "v":
        assert nan_rows[expected].all()
        return
    assert torch.equal(nan_rows, expected) and torch.equal(lse.isnan(), expected)
    assert torch.equal(out[~expected], clean[~expected]) and torch.equal(lse[~expected], clean_lse[~expected])
