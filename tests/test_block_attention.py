"""Block executor: the Triton BlockPlan kernel against the block reference and dense masked attention,
the executor's capabilities and selection, and BlockPlan -> StripePlan conversion.

The kernel runs interpreted on the CPU unless a GPU run sets TRITON_INTERPRET=0. Shapes stay
small (a 2-core CI runs the interpreter); each case still spans several query blocks, a last
block shorter than the others, GQA with one plan per KV head or per query head, and batch 2.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels run on the CPU

import dataclasses
import re
from dataclasses import dataclass

import pytest
import torch

from kernel_checks import DEVICE, TOLERANCES, assert_close, needs_kernel, random_qkv
from plan_factories import masked_attention, random_block_plan
from sparse_prefill.dispatch import NoCapableExecutorError, select_executor
from sparse_prefill.interfaces import AttentionContext
from sparse_prefill.kernels.block_attention import BLOCK_HEAD_DIMS, block_attention
from sparse_prefill.kernels.executors import TritonBlockExecutor
from sparse_prefill.kernels.reference import block_attention_reference, dense_attention_reference
from sparse_prefill.plan import BlockPlan
from sparse_prefill.registry import get_registry


@dataclass(frozen=True)
class Case:
    batch: int
    num_q: int
    num_kv: int
    seq_len: int
    head_dim: int
    block_size: int
    shared: bool  # plan heads = KV heads (one list per GQA group) instead of query heads
    dtype: torch.dtype = torch.float32

    @property
    def plan_heads(self) -> int:
        return self.num_kv if self.shared else self.num_q

    def id(self) -> str:
        heads = "kv" if self.shared else "q"
        dtype = str(self.dtype).removeprefix("torch.")
        return (f"b{self.batch}-q{self.num_q}kv{self.num_kv}-n{self.seq_len}-d{self.head_dim}-bs{self.block_size}"
                f"-plan_{heads}-{dtype}")


def _inputs(case: Case, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return random_qkv(case, seed, DEVICE)


def _plan(case: Case, fraction: float, seed: int, keep_diagonal: bool = True) -> BlockPlan:
    return random_block_plan(case.batch, case.plan_heads, case.seq_len, case.block_size, fraction=fraction,
                             seed=seed, device=DEVICE, keep_diagonal=keep_diagonal)


# GQA 1 and 4, plans per KV head and per query head, block sizes 64 and 128 (and 96, 32: other
# multiples of 16), lengths that are no multiple of the block.
CASES = [
    Case(2, 4, 1, 200, 64, 64, shared=True),  # GQA 4, one list per group: 4 heads stacked per tile
    Case(2, 4, 1, 200, 64, 64, shared=False),  # GQA 4, a list per query head
    Case(2, 2, 2, 300, 64, 128, shared=False),  # GQA 1, block 128
    Case(2, 8, 2, 290, 64, 128, shared=True),  # GQA 4, block 128, two KV heads
    Case(1, 4, 1, 130, 128, 64, shared=True, dtype=torch.float16),
    Case(1, 4, 2, 150, 96, 64, shared=False, dtype=torch.bfloat16),  # padded head dim
    Case(1, 2, 1, 100, 256, 32, shared=True, dtype=torch.float16),  # head dim 256, block 32
    Case(1, 2, 1, 200, 64, 96, shared=True),  # block 96: 32-key tiles
    Case(1, 5, 1, 150, 64, 64, shared=True, dtype=torch.bfloat16),  # GQA 5: 5 tiles of 64 slots per block
    Case(1, 6, 2, 140, 128, 32, shared=True),  # GQA 3, block 32: tiles end mid-row
]


@needs_kernel
@pytest.mark.parametrize("case", CASES, ids=Case.id)
def test_kernel_matches_reference_and_dense_mask(case: Case) -> None:
    q, k, v = _inputs(case, seed=1)
    plan = _plan(case, fraction=0.4, seed=2)
    scale = case.head_dim**-0.5
    out, lse = block_attention(q, k, v, plan, scale, return_lse=True)
    assert out.dtype == q.dtype and out.shape == q.shape and lse.shape == q.shape[:3] and lse.dtype == torch.float32
    expected_out, expected_lse = block_attention_reference(q, k, v, plan, scale, return_lse=True)
    tol = TOLERANCES[case.dtype]
    assert_close(out, expected_out, tol["atol"], tol["rtol"], what="out vs reference")
    assert_close(lse, expected_lse, tol["lse_atol"], 0.0, what="lse vs reference")
    if case.dtype == torch.float32:  # the mask is the plan's meaning, independent of the reference's code
        dense_out, dense_lse = masked_attention(q, k, v, plan.to_dense(), scale)
        assert_close(out, dense_out, tol["atol"], tol["rtol"], what="out vs dense mask")
        assert_close(lse, dense_lse, tol["lse_atol"], 0.0, what="lse vs dense mask")


@needs_kernel
@pytest.mark.parametrize("case", [CASES[0], CASES[2]], ids=Case.id)
def test_diagonal_only_and_full_causal_plans(case: Case) -> None:
    """Diagonal only: block-local causal attention. Every block: dense causal attention."""
    q, k, v = _inputs(case, seed=3)
    scale = case.head_dim**-0.5
    diagonal = _plan(case, fraction=0.0, seed=4)
    assert int(diagonal.counts().max()) == 1
    out, lse = block_attention(q, k, v, diagonal, scale, return_lse=True)
    dense_out, dense_lse = masked_attention(q, k, v, diagonal.to_dense(), scale)
    assert_close(out, dense_out, 1e-5, 1e-4, what="diagonal-only out")
    assert_close(lse, dense_lse, 1e-5, 0.0, what="diagonal-only lse")
    full = _plan(case, fraction=1.0, seed=5)
    assert abs(full.density() - 1.0) < 1e-12
    out, lse = block_attention(q, k, v, full, scale, return_lse=True)
    causal_out, causal_lse = dense_attention_reference(q, k, v, scale, return_lse=True)
    assert_close(out, causal_out, 1e-5, 1e-4, what="full-plan out")
    assert_close(lse, causal_lse, 1e-5, 0.0, what="full-plan lse")


@needs_kernel
@pytest.mark.filterwarnings("ignore:divide by zero encountered in log2")  # the interpreter's numpy: lse -inf
def test_segments_without_diagonal_or_any_block_match_the_reference() -> None:
    """A valid plan may drop a diagonal block or select nothing: rows that attend no key get output 0
    and lse -inf (as the reference), never NaN."""
    case = Case(2, 4, 2, 300, 64, 64, shared=False)
    q, k, v = _inputs(case, seed=6)
    plan = _plan(case, fraction=0.3, seed=7, keep_diagonal=False)
    counts = plan.counts()
    assert (counts == 0).any() and (counts > 0).any()
    out, lse = block_attention(q, k, v, plan, 0.125, return_lse=True)
    expected_out, expected_lse = block_attention_reference(q, k, v, plan, 0.125, return_lse=True)
    assert torch.isfinite(out).all()
    empty_rows = (counts == 0).repeat_interleave(case.block_size, dim=-1)[..., : case.seq_len]
    empty_rows = empty_rows.repeat_interleave(case.num_q // case.plan_heads, dim=1).to(lse.device)
    assert torch.equal(lse == float("-inf"), empty_rows) and torch.equal(expected_lse == float("-inf"), empty_rows)
    assert (out[empty_rows] == 0).all()
    assert_close(out, expected_out, 1e-5, 1e-4, what="out")
    assert_close(lse[~empty_rows], expected_lse[~empty_rows], 1e-5, 0.0, what="lse")


@needs_kernel
def test_out_is_written_in_place_and_strided_inputs_are_read() -> None:
    """out= a view of a larger tensor is filled and returned; q in [B, N, H, D] storage, k with a head-dim stride 2."""
    case = Case(2, 4, 2, 140, 64, 64, shared=True)
    q, k, v = _inputs(case, seed=8)
    plan = _plan(case, fraction=0.5, seed=9)
    q_strided = q.transpose(1, 2).contiguous().transpose(1, 2)
    k_strided = torch.stack([k, torch.zeros_like(k)], dim=-1).flatten(-2)[..., ::2]
    storage = torch.full((2, 6, 140, 64), float("nan"), device=DEVICE)
    out = storage[:, 1:5]
    returned, lse = block_attention(q_strided, k_strided, v, plan, 0.125, out=out)
    expected, _ = block_attention_reference(q, k, v, plan, 0.125)
    assert returned.data_ptr() == out.data_ptr() and lse is None
    assert_close(out, expected, 1e-5, 1e-4, what="out")
    assert storage[:, 0].isnan().all() and storage[:, 5].isnan().all()  # nothing written outside the view
    allocated, _ = block_attention(q_strided, k_strided, v, plan, 0.125)
    assert allocated.stride() == q_strided.stride() and torch.equal(allocated, out)  # laid out as q is


@needs_kernel
def test_a_verdict_of_zero_writes_nothing_and_of_one_runs_the_plan() -> None:
    case = Case(1, 2, 1, 200, 64, 64, shared=True)
    q, k, v = _inputs(case, seed=12)
    plan = _plan(case, fraction=0.5, seed=13)
    untouched = torch.full_like(q, 7.0)
    block_attention(q, k, v, plan, 0.125, out=untouched, verdict=torch.zeros(1, dtype=torch.int32, device=DEVICE))
    assert bool((untouched == 7.0).all())
    ran, _ = block_attention(q, k, v, plan, 0.125, verdict=torch.ones(1, dtype=torch.int32, device=DEVICE))
    assert torch.equal(ran, block_attention(q, k, v, plan, 0.125)[0])


@needs_kernel
def test_kernel_reads_a_plan_with_strided_csr_tensors() -> None:
    case = Case(1, 2, 1, 200, 64, 64, shared=True)
    q, k, v = _inputs(case, seed=10)
    plan = _plan(case, fraction=0.5, seed=11)
    spread = lambda x: torch.stack([x, torch.zeros_like(x)], dim=-1).flatten()[::2]  # noqa: E731
    strided = dataclasses.replace(plan, offsets=spread(plan.offsets), indices=spread(plan.indices))
    assert not strided.indices.is_contiguous()
    assert_close(block_attention(q, k, v, strided, 0.125)[0], block_attention_reference(q, k, v, plan, 0.125)[0],
                 1e-5, 1e-4, what="out")


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_large_scores_stay_finite(dtype: torch.dtype) -> None:
    case = Case(1, 2, 1, 140, 64, 64, shared=True, dtype=dtype)
    q, k, v = _inputs(case, seed=12)
    out, lse = block_attention(q * 20, k * 20, v, _plan(case, fraction=0.5, seed=13), 1.0, return_lse=True)
    assert torch.isfinite(out.float()).all() and torch.isfinite(lse).all()


def test_cases_cover_declared_head_dims() -> None:
    assert set(BLOCK_HEAD_DIMS) <= {case.head_dim for case in CASES}


# ---------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------


def _call(**changes) -> dict:
    case = Case(1, 4, 2, 64, 64, 32, shared=True)
    q, k, v = _inputs(case, seed=0)
    call = {"q": q, "k": k, "v": v, "plan": _plan(case, fraction=0.5, seed=0), "scale": 0.125}
    return {**call, **changes}


@pytest.mark.parametrize("changes, error, message", [
    pytest.param(lambda c: {"plan": dataclasses.replace(c["plan"], block_size=24)}, ValueError, "multiples of 16",
                 id="block-size"),
    # The plan's heads and CSR are checked after the device: only where the kernel runs (DEVICE).
    pytest.param(lambda c: {"plan": dataclasses.replace(c["plan"], heads=3)}, ValueError,
                 "query heads (4) or the KV heads (2)", id="plan-heads", marks=needs_kernel),
    pytest.param(lambda c: {"plan": dataclasses.replace(c["plan"], offsets=c["plan"].offsets.int())}, ValueError,
                 "int64 offsets of length 5", id="csr-dtype", marks=needs_kernel),
    pytest.param(lambda c: {x: c[x][..., :32] for x in "qkv"}, ValueError, "head dims", id="head-dim-32"),
    pytest.param(lambda c: {"plan": object()}, TypeError, "BlockPlan, got object", id="plan-kind"),
])
def test_kernel_validation_errors(changes, error: type[Exception], message: str) -> None:
    call = _call()
    call.update(changes(call))
    with pytest.raises(error, match=re.escape(message)):
        block_attention(**call)


# ---------------------------------------------------------------------------------------------
# The executor: capabilities, registration, selection
# ---------------------------------------------------------------------------------------------


def test_executor_is_registered_and_selected_for_block_plans_where_triton_runs() -> None:
    assert any(isinstance(executor, TritonBlockExecutor) for executor in get_registry().executors())
    call = _call()
    q, plan = call["q"], call["plan"]
    executor = TritonBlockExecutor()
    assert executor.plan_kinds == (BlockPlan,) and not executor.supports_backward
    if DEVICE is not None:  # a CUDA device, or the CPU under the interpreter: Triton runs here
        assert select_executor(q, plan).name == "triton-block"
        out, _ = executor(call["q"], call["k"], call["v"], plan, AttentionContext.for_inputs(q, call["k"], 0.125))
        assert_close(out, block_attention_reference(q, call["k"], call["v"], plan, 0.125)[0], 1e-5, 1e-4, what="out")
    # What the kernel cannot take goes to the reference, with the reason named.
    odd_block = dataclasses.replace(plan, block_size=24)
    assert "block size 24 not a multiple of 16" in executor.not_supported_reasons(q, odd_block)
    assert select_executor(q, odd_block).name == "reference"
    assert any("head dim 32" in reason for reason in executor.not_supported_reasons(q[..., :32], plan))
    assert select_executor(q.double(), plan).name == "reference"


@needs_kernel  # elsewhere the executor refuses the device before the missing backward
def test_executor_refuses_inputs_that_require_grad() -> None:
    from sparse_prefill.dispatch import _execute  # noqa: PLC0415  (the dispatcher's own check)

    call = _call()
    q, k, v = (call[x].detach().requires_grad_() for x in "qkv")
    with pytest.raises(NoCapableExecutorError, match="triton-block has no backward"):
        _execute(q, k, v, call["plan"], AttentionContext.for_inputs(q, k, 0.125), TritonBlockExecutor(), False)


# ---------------------------------------------------------------------------------------------
# BlockPlan -> StripePlan
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seq_len, block_size, fraction",
                         [(200, 64, 0.4), (300, 128, 1.0), (130, 32, 0.0), (1, 16, 0.5)])
def test_block_plan_converts_to_the_same_stripe_mask(seq_len: int, block_size: int, fraction: float) -> None:
    plan = random_block_plan(2, 3, seq_len, block_size, fraction=fraction, seed=seq_len)
    stripes = plan.to_stripe_plan()
    stripes.validate()
    assert (stripes.group_rows, stripes.sink, stripes.local, stripes.plan_heads) == (block_size, 0, 0, 3)
    assert torch.equal(stripes.to_dense(), plan.to_dense())
    assert stripes.density() == pytest.approx(plan.density(), rel=1e-12)
    # Only the selected off-diagonal blocks are expanded: block_size indices each.
    assert stripes.indices.numel() == (plan.indices.numel() - plan.batch * plan.heads * plan.num_blocks) * block_size


def test_block_plan_without_a_diagonal_block_refuses_to_convert() -> None:
    plan = random_block_plan(1, 2, 200, 64, fraction=0.5, seed=3, keep_diagonal=False)
    first_rows = torch.arange(plan.num_blocks) * plan.block_size
    keeps_diagonal = plan.to_dense()[:, :, first_rows, first_rows]  # a block's first row attends itself
    assert not keeps_diagonal.all()
    with pytest.raises(ValueError, match="lack their diagonal block"):
        plan.to_stripe_plan()
