"""AnchorAttention identifier: Triton kernel (interpreted on the CPU) vs the PyTorch reference vs the rule itself.

Plans are compared exactly (same offsets, same indices). The only tolerated difference is a key
whose margin ``pooled score + theta - pooled anchor`` lies within ``TIE`` of zero: there the two
fp32 implementations may round the threshold test differently because they sum in different
orders. The float64 restatement of the rule below decides what counts as such a near-tie.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels run on the CPU

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

from kernel_checks import DEVICE, needs_kernel
import sparse_prefill.patterns.anchor as anchor_pattern
from sparse_prefill.interfaces import AttentionContext, PlanBudgetExceeded
from sparse_prefill.patterns.anchor import kernel as anchor_identify_module
from sparse_prefill.patterns.anchor.kernel import anchor_identify, not_supported_reasons
from sparse_prefill.patterns.anchor import ANCHOR
from sparse_prefill.patterns.anchor.reference import anchor_identify_reference
from sparse_prefill.plan import DensePlan, PendingPlan, StripePlan, plan_nbytes

TIE = 1e-4  # fp32 rounding of D-term dot products and block means stays far below this


@dataclass(frozen=True)
class Case:
    batch: int
    num_q: int
    num_kv: int
    seq_len: int
    head_dim: int
    block: int
    group_blocks: int
    sink: int
    local: int
    share_kv_heads: bool
    dtype: torch.dtype = torch.float32
    theta: float | tuple[float, ...] = 4.0  # a tuple: one per query head

    @property
    def id(self) -> str:
        sharing = "shared" if self.share_kv_heads else "perhead"
        thetas = "-thetas" + "_".join(f"{t:g}" for t in self.theta) if isinstance(self.theta, tuple) else ""
        return (
            f"b{self.batch}-h{self.num_q}x{self.num_kv}-n{self.seq_len}-d{self.head_dim}-blk{self.block}"
            f"x{self.group_blocks}-sink{self.sink}-local{self.local}-{sharing}-{str(self.dtype)[6:]}{thetas}"
        )

    def head_theta(self, head: int) -> float:
        return self.theta[head] if isinstance(self.theta, tuple) else self.theta

    def params(self, **overrides: object) -> dict:
        params = dict(
            scale=self.head_dim**-0.5, theta=self.theta, block=self.block, group_blocks=self.group_blocks,
            sink=self.sink, local=self.local, share_kv_heads=self.share_kv_heads,
        )
        return {**params, **overrides}


CASES = [
    Case(1, 1, 1, 1, 64, 16, 1, 0, 0, False),
    Case(1, 2, 2, 100, 64, 16, 1, 0, 0, False),
    Case(2, 3, 1, 100, 64, 16, 2, 8, 16, True),
    Case(1, 3, 1, 257, 96, 32, 2, 16, 32, True),
    Case(1, 3, 1, 257, 96, 32, 2, 16, 32, False),
    Case(1, 6, 2, 257, 128, 32, 1, 0, 40, True, torch.bfloat16),
    Case(1, 3, 3, 600, 128, 64, 1, 64, 64, False, torch.float16),
    Case(1, 3, 1, 600, 64, 48, 2, 100, 0, True),
    Case(1, 4, 2, 600, 64, 16, 1, 16, 16, False),  # 38 groups: several scan programs per KV head
    # A theta per query head (head groups calibrated apart, run as one call): per KV group, and within one.
    Case(1, 4, 2, 600, 64, 16, 1, 16, 16, True, theta=(2.0, 2.0, 6.0, 6.0)),
    Case(1, 4, 2, 257, 64, 32, 2, 16, 32, False, theta=(1.0, 5.0, 3.0, -2.0)),
    Case(1, 6, 2, 257, 128, 32, 1, 0, 40, True, torch.bfloat16, theta=(6.0, 6.0, 3.0, 3.0, 3.0, 3.0)),
]


def _inputs(case: Case, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k with a shared direction and per-key strength, so pooled scores spread like real heavy hitters.

    Plain Gaussian inputs average out in a pooled query: every candidate then scores alike and
    the selection flips from nothing to everything within a fraction of a nat of theta.
    """
    gen = torch.Generator().manual_seed(seed)
    direction = torch.randn(case.head_dim, generator=gen)
    q = torch.randn(case.batch, case.num_q, case.seq_len, case.head_dim, generator=gen) + 0.5 * direction
    strength = 0.5 * torch.randn(case.batch, case.num_kv, case.seq_len, 1, generator=gen)
    k = torch.randn(case.batch, case.num_kv, case.seq_len, case.head_dim, generator=gen) + strength * direction
    return q.to(case.dtype), k.to(case.dtype)


def _rule_margins(q: torch.Tensor, k: torch.Tensor, case: Case, plan: StripePlan) -> dict[int, torch.Tensor]:
    """Float64 restatement of the selection rule, row by row: margin[segment][j - sink_end] >= 0 keeps key j."""
    q64, k64 = q.double(), k.double()
    scale, gqa = case.head_dim**-0.5, case.num_q // case.num_kv
    margins: dict[int, torch.Tensor] = {}
    for b in range(case.batch):
        for head in range(case.num_q):
            keys = k64[b, head // gqa]
            plan_head = head // gqa if case.share_kv_heads else head
            for group in range(plan.num_groups):
                row_start, row_end, sink_end, local_start = plan.group_bounds(group)
                rows = torch.arange(row_start, row_end).unsqueeze(1)
                cols = torch.arange(row_end).unsqueeze(0)
                window = (cols < sink_end) | ((cols >= local_start) & (cols <= rows))
                rows_q = q64[b, head, row_start:row_end]
                scores = scale * rows_q @ keys[:row_end].T
                anchors = scores.masked_fill(~window | scores.isnan(), float("-inf")).amax(dim=1)  # NaN: no count
                # Rows with a non-finite q or anchor stay out of the pool; a block without any keeps nothing.
                finite = torch.isfinite(rows_q).all(dim=1) & torch.isfinite(anchors)
                margin = torch.full((local_start - sink_end,), float("-inf"), dtype=torch.float64)
                for start in range(0, row_end - row_start, case.block):
                    pooled_rows = torch.arange(start, min(start + case.block, row_end - row_start))
                    pooled_rows = pooled_rows[finite[pooled_rows]]
                    if not len(pooled_rows):
                        continue
                    pooled_q = rows_q[pooled_rows].mean(dim=0)
                    pooled_anchor = anchors[pooled_rows].mean()
                    pooled = scale * keys[sink_end:local_start] @ pooled_q + case.head_theta(head) - pooled_anchor
                    margin = torch.maximum(margin, pooled)
                segment = (b * plan.plan_heads + plan_head) * plan.num_groups + group
                margins[segment] = torch.maximum(margins.get(segment, margin), margin)
    return margins


def _selected(plan: StripePlan, segment: int) -> set[int]:
    return set(plan.indices[plan.offsets[segment] : plan.offsets[segment + 1]].tolist())


def _kernel_tie(q: torch.Tensor, k: torch.Tensor, case: Case) -> tuple[float, int]:
    """(margin, 1/rate): where the kernel may disagree with the reference, and at most how often.

    On a GPU the kernel multiplies fp32 inputs in tf32 (patterns/anchor/kernel.py _FP32_DOT_PRECISION):
    each operand keeps 10 mantissa bits, so a score is off by at most 2^-10 * scale * sum_d |q_d k_d|,
    and a margin (pooled score against pooled anchor) by twice that. Everywhere else: fp32 rounding.
    """
    if DEVICE != "cuda" or case.dtype != torch.float32:
        return TIE, 1000
    keys = k.abs().repeat_interleave(case.num_q // case.num_kv, dim=1).transpose(-1, -2)
    worst = float((q.abs() @ keys).max()) * case.head_dim**-0.5
    return TIE + 2 * 2**-10 * worst, 100


def _assert_same_plan(actual: StripePlan, expected: StripePlan, margins: dict[int, torch.Tensor],
                      tie: tuple[float, int] = (TIE, 1000)) -> None:
    """Identical plans, except keys at near-ties of the rule (|margin| < tie[0]), at most one in tie[1]."""
    assert (actual.batch, actual.plan_heads, actual.seq_len, actual.group_rows) == (
        expected.batch, expected.plan_heads, expected.seq_len, expected.group_rows,
    )
    if torch.equal(actual.offsets, expected.offsets) and torch.equal(actual.indices, expected.indices):
        return
    differing = []
    for segment, margin in margins.items():
        sink_end = expected.group_bounds(segment % expected.num_groups)[2]
        differing += [float(margin[key - sink_end]) for key in _selected(actual, segment) ^ _selected(expected, segment)]
    margin, rate = tie
    assert all(abs(m) < margin for m in differing), f"plans differ away from threshold ties, margins {differing[:10]}"
    assert len(differing) <= max(1, expected.indices.numel() // rate), f"{len(differing)} near-tie differences"


def _selection_rule(q: torch.Tensor, k: torch.Tensor, case: Case, plan: StripePlan) -> StripePlan:
    """The plan the float64 rule gives, in plan's layout (for exact comparison away from ties)."""
    counts, indices = [], []
    for segment, margin in sorted(_rule_margins(q, k, case, plan).items()):
        sink_end = plan.group_bounds(segment % plan.num_groups)[2]
        kept = (margin >= 0).nonzero().flatten() + sink_end
        counts.append(kept.numel())
        indices.append(kept)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.tensor(counts).cumsum(0)])
    return StripePlan(plan.batch, plan.plan_heads, plan.seq_len, plan.group_rows, plan.sink, plan.local,
                      offsets, torch.cat(indices).int())


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_reference_follows_the_rule(case: Case) -> None:
    q, k = _inputs(case)
    plan = anchor_identify_reference(q, k, **case.params())
    rule = _selection_rule(q, k, case, plan)
    _assert_same_plan(plan, rule, _rule_margins(q, k, case, plan))


@needs_kernel
@pytest.mark.parametrize("keep_bits", [True, False], ids=["keep-bits", "rescore"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_kernel_matches_reference(case: Case, keep_bits: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not keep_bits:  # no room for keep bits (very long prompts): the write pass scores every candidate again
        monkeypatch.setattr(anchor_identify_module, "_KEEP_BITS_FRACTION", 0.0)
    q, k = _inputs(case)
    expected = anchor_identify_reference(q, k, **case.params())
    actual = anchor_identify(q.to(DEVICE), k.to(DEVICE), **case.params())  # DEVICE: cuda under TRITON_INTERPRET=0
    actual = dataclasses.replace(actual, offsets=actual.offsets.cpu(), indices=actual.indices.cpu())
    actual.validate()
    assert actual.plan_heads == (case.num_kv if case.share_kv_heads else case.num_q)
    assert actual.offsets.dtype == torch.int64 and actual.indices.dtype == torch.int32
    _assert_same_plan(actual, expected, _rule_margins(q, k, case, expected), _kernel_tie(q, k, case))
    if case.seq_len > case.block * case.group_blocks + case.local:
        assert 0 < actual.indices.numel(), "theta should select some candidates on these inputs"


IDENTIFIERS: dict[str, Callable[..., StripePlan]] = {"reference": anchor_identify_reference, "triton": anchor_identify}
NAMES = ["reference", pytest.param("triton", marks=needs_kernel)]  # the kernel only where it can run
EDGE_CASE = Case(1, 3, 1, 257, 64, 32, 2, 16, 32, True)


def _run(identify: Callable[..., StripePlan | DensePlan], q: torch.Tensor, k: torch.Tensor, **params: object
         ) -> StripePlan | DensePlan:
    """``identify`` on q, k where it runs (the kernel: DEVICE, a GPU under TRITON_INTERPRET=0), the plan on the CPU."""
    device = DEVICE if identify is anchor_identify else "cpu"
    plan = identify(q.to(device), k.to(device), **params)
    if isinstance(plan, StripePlan):
        plan = dataclasses.replace(plan, offsets=plan.offsets.cpu(), indices=plan.indices.cpu())
    return plan


@pytest.mark.parametrize("share_kv_heads", [True, False], ids=["shared", "perhead"])
@pytest.mark.parametrize("name", NAMES)
def test_huge_theta_keeps_every_candidate(name: str, share_kv_heads: bool) -> None:
    q, k = _inputs(EDGE_CASE)
    plan = _run(IDENTIFIERS[name], q, k, **EDGE_CASE.params(theta=1e30, share_kv_heads=share_kv_heads))
    causal = torch.ones(EDGE_CASE.seq_len, EDGE_CASE.seq_len, dtype=torch.bool).tril()
    assert plan.density() == pytest.approx(1.0)
    assert torch.equal(plan.to_dense(), causal.expand_as(plan.to_dense()))


@pytest.mark.parametrize("name", NAMES)
def test_very_negative_theta_keeps_only_windows(name: str) -> None:
    q, k = _inputs(EDGE_CASE)
    plan = _run(IDENTIFIERS[name], q, k, **EDGE_CASE.params(theta=-1e30))
    plan.validate()
    assert plan.indices.numel() == 0 and int(plan.offsets[-1]) == 0
    assert plan.density() < 1.0


@pytest.mark.parametrize("name", NAMES)
def test_shared_plan_is_union_of_query_heads(name: str) -> None:
    q, k = _inputs(EDGE_CASE)
    shared = _run(IDENTIFIERS[name], q, k, **EDGE_CASE.params(share_kv_heads=True)).to_dense()
    per_head = _run(IDENTIFIERS[name], q, k, **EDGE_CASE.params(share_kv_heads=False)).to_dense()
    gqa = EDGE_CASE.num_q // EDGE_CASE.num_kv
    assert torch.equal(shared, per_head.unflatten(1, (EDGE_CASE.num_kv, gqa)).any(dim=2))


@pytest.mark.parametrize("share_kv_heads", [True, False], ids=["shared", "perhead"])
@pytest.mark.parametrize("name", NAMES)
def test_a_theta_per_head_selects_what_calls_apart_select(name: str, share_kv_heads: bool) -> None:
    """The promise that lets head groups with different thetas run as one call: each KV group's part of the
    one-call plan is the plan of that group's own call with its own theta."""
    case = Case(1, 6, 3, 300, 64, 32, 1, 16, 32, share_kv_heads)
    thetas = (1.0, 1.0, 4.0, 4.0, 9.0, 9.0) if share_kv_heads else (1.0, 2.0, 4.0, 3.0, 9.0, 0.0)
    q, k = _inputs(case, seed=3)
    whole = _run(IDENTIFIERS[name], q, k, **case.params(theta=thetas))
    per_kv = 1 if share_kv_heads else 2
    densities = []
    for kv in range(case.num_kv):
        heads = slice(2 * kv, 2 * kv + 2)
        theta = thetas[heads] if not share_kv_heads else thetas[2 * kv]
        alone = _run(IDENTIFIERS[name], q[:, heads], k[:, kv:kv + 1], **case.params(theta=theta))
        part = whole.select_heads(kv * per_kv, (kv + 1) * per_kv)
        assert torch.equal(part.offsets, alone.offsets) and torch.equal(part.indices, alone.indices)
        densities.append(alone.density())
    assert densities[0] < densities[1] < densities[2], "larger thetas should keep more on these inputs"


@pytest.mark.parametrize("name", IDENTIFIERS)
def test_a_theta_list_of_the_wrong_length_is_refused(name: str) -> None:
    q, k = _inputs(EDGE_CASE)
    with pytest.raises(ValueError, match=r"one per query head \(3\), got 2"):
        IDENTIFIERS[name](q, k, **EDGE_CASE.params(theta=(1.0, 2.0)))


@needs_kernel
def test_kernel_reads_strided_inputs_in_place() -> None:
    """Hugging Face hands over [B, N, H, D] storage transposed to [B, H, N, D]: strides, not copies."""
    q, k = (x.to(DEVICE) for x in _inputs(EDGE_CASE))
    strided_q, strided_k = q.transpose(1, 2).contiguous().transpose(1, 2), k.transpose(1, 2).contiguous().transpose(1, 2)
    assert not strided_q.is_contiguous()
    expected = anchor_identify(q, k, **EDGE_CASE.params())
    actual = anchor_identify(strided_q, strided_k, **EDGE_CASE.params())
    assert torch.equal(actual.offsets, expected.offsets) and torch.equal(actual.indices, expected.indices)


def _good() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(1, 2, 40, 64), torch.randn(1, 1, 40, 64)


SHARED_ERRORS = {
    "q-3d": (lambda: (torch.randn(2, 40, 64), _good()[1]), {}, ValueError, r"q must be \[B, Hq, N, D\]"),
    "length-mismatch": (lambda: (_good()[0], torch.randn(1, 1, 41, 64)), {}, ValueError, "share non-empty"),
    "heads-not-multiple": (lambda: (torch.randn(1, 3, 40, 64), torch.randn(1, 2, 40, 64)), {}, ValueError, "Hq=3 and Hkv=2"),
    "block-zero": (_good, {"block": 0}, ValueError, "block must be an int >= 1, got 0"),
    "group-blocks-float": (_good, {"group_blocks": 1.5}, ValueError, "group_blocks must be an int"),
    "sink-negative": (_good, {"sink": -1}, ValueError, "sink must be an int >= 0, got -1"),
    "local-negative": (_good, {"local": -4}, ValueError, "local must be an int >= 0, got -4"),
    "theta-nan": (_good, {"theta": float("nan")}, ValueError, "theta must be a real number"),
    "scale-zero": (_good, {"scale": 0.0}, ValueError, "scale must be positive"),
    "share-not-bool": (_good, {"share_kv_heads": "yes"}, TypeError, "share_kv_heads must be a bool"),
    "dense-above-zero": (_good, {"dense_above": 0.0}, ValueError, r"dense_above must be a density in \(0, 1\], got 0.0"),
}
KERNEL_ERRORS = {
    "int-dtype": (lambda: (torch.ones(1, 2, 40, 64, dtype=torch.int32), torch.ones(1, 1, 40, 64, dtype=torch.int32)), {}, TypeError, "torch.int32"),
    "mixed-dtype": (lambda: (_good()[0].half(), _good()[1]), {}, TypeError, "torch.float16 and torch.float32"),
    "head-dim-8": (lambda: (torch.randn(1, 2, 40, 8), torch.randn(1, 1, 40, 8)), {}, ValueError, r"head dim must be in \[16, 256\], got 8"),
    "head-dim-512": (lambda: (torch.randn(1, 2, 4, 512), torch.randn(1, 1, 4, 512)), {}, ValueError, "got 512"),
    "block-256": (_good, {"block": 256}, ValueError, "block must be <= 128 rows, got 256"),
    "scan-rows": (_good, {"group_blocks": 65}, ValueError, "stacks 256 pooled rows per program"),
    "meta-device": (lambda: (torch.randn(1, 2, 40, 64, device="meta"), torch.randn(1, 1, 40, 64, device="meta")), {}, ValueError, "got meta"),
}
# Raised after the device check: only where the kernel can run (DEVICE), like the kernel itself.
AFTER_DEVICE_CHECK = {"head-dim-8", "head-dim-512", "block-256", "scan-rows"}
KERNEL_ERROR_PARAMS = [pytest.param(*case, id=name, marks=[needs_kernel] if name in AFTER_DEVICE_CHECK else [])
                       for name, case in KERNEL_ERRORS.items()]


def _call(identify: Callable[..., StripePlan], make: Callable, overrides: dict) -> None:
    params = dict(scale=0.125, theta=4.0, block=16, group_blocks=1, sink=4, local=4, share_kv_heads=True)
    identify(*make(), **{**params, **overrides})


@pytest.mark.parametrize("name", IDENTIFIERS)
@pytest.mark.parametrize("make, overrides, error, message", SHARED_ERRORS.values(), ids=SHARED_ERRORS.keys())
def test_bad_inputs_are_refused_with_reasons(name: str, make: Callable, overrides: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        _call(IDENTIFIERS[name], make, overrides)


@pytest.mark.parametrize("make, overrides, error, message", KERNEL_ERROR_PARAMS)
def test_kernel_refuses_what_it_cannot_run(make: Callable, overrides: dict, error: type, message: str) -> None:
    on_device = lambda: tuple(x if x.is_meta else x.to(DEVICE) for x in make())  # noqa: E731  (meta stays meta)
    with pytest.raises(error, match=message):
        _call(anchor_identify, on_device, overrides)


def _gaussian_problem(seed: int, batch: int, seq_len: int, theta: float, share_kv_heads: bool, **params: object
                      ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Plain Gaussian q [batch, 4, N, 64], k [batch, 2, N, 64] and small-tile anchor parameters."""
    torch.manual_seed(seed)
    q, k = torch.randn(batch, 4, seq_len, 64), torch.randn(batch, 2, seq_len, 64)
    return q, k, dict(scale=0.125, theta=theta, block=32, group_blocks=1, sink=16, local=32,
                      share_kv_heads=share_kv_heads, **params)


@needs_kernel
@pytest.mark.parametrize("seq_len, dense_tail", [(300, 1), (300, 100), (257, 200), (200, 0)], ids=str)
@pytest.mark.parametrize("share_kv_heads", [False, True], ids=["per-head", "shared"])
def test_dense_tail_keeps_every_candidate_of_the_last_groups(seq_len, dense_tail, share_kv_heads):
    # theta -1e9: the scores keep nothing, so everything selected comes from the dense tail.
    q, k, params = _gaussian_problem(seq_len + dense_tail, 1, seq_len, -1e9, share_kv_heads, dense_tail=dense_tail)
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    for identify in (anchor_identify_reference, anchor_identify):
        plan = _run(identify, q, k, **params)
        plan.validate()
        row_end = torch.clamp((torch.arange(plan.num_groups) + 1) * plan.group_rows, max=seq_len)
        in_tail = row_end > seq_len - dense_tail
        assert not plan.counts()[..., ~in_tail].any(), identify.__name__
        tail_rows = torch.arange(seq_len) >= int(in_tail.int().argmax()) * plan.group_rows if in_tail.any() else []
        mask = plan.to_dense()[0, 0]
        assert torch.equal(mask[tail_rows], causal[tail_rows]), identify.__name__


@needs_kernel
@pytest.mark.parametrize("share_kv_heads", [False, True], ids=["per-head", "shared"])
def test_plans_denser_than_dense_above_become_dense(share_kv_heads):
    q, k, params = _gaussian_problem(5, 2, 300, 0.5, share_kv_heads)
    sparse = anchor_identify_reference(q, k, **params)
    density = sparse.density()
    assert 0 < density < 1
    for identify in (anchor_identify_reference, anchor_identify):
        # Just above the plan's density: the stripes are kept, identical to the plan without a threshold.
        kept = _run(identify, q, k, **params, dense_above=min(1.0, density + 1e-6))
        assert isinstance(kept, StripePlan) and torch.equal(kept.offsets, sparse.offsets), identify.__name__
        # Just below: dense attention for every query head.
        dense = _run(identify, q, k, **params, dense_above=density - 1e-6)
        assert isinstance(dense, DensePlan) and (dense.batch, dense.heads, dense.seq_len) == (2, 4, 300)


@needs_kernel
@pytest.mark.parametrize("share_kv_heads", [False, True], ids=["per-head", "shared"])
def test_the_declared_budget_covers_the_plan_and_the_keep_bits(share_kv_heads):
    q, k, params = _gaussian_problem(6, 1, 700, 2.0, share_kv_heads)
    plan = _run(anchor_identify, q, k, **params)
    with pytest.raises(PlanBudgetExceeded) as exceeded:
        _run(anchor_identify, q, k, **params, max_plan_bytes=plan_nbytes(plan))
    declared = sum(exceeded.value.kv_head_bytes)
    # The keep bits live beside the key lists, so they count: a budget of the plan alone is too small ...
    assert declared > plan_nbytes(plan)
    per_head = exceeded.value.query_head_bytes
    assert (per_head is None) == share_kv_heads and (per_head is None or sum(per_head) == declared)
    # ... and the declared bytes are exactly enough, for the same plan.
    fitted = _run(anchor_identify, q, k, **params, max_plan_bytes=declared)
    assert torch.equal(fitted.offsets, plan.offsets) and torch.equal(fitted.indices, plan.indices)


@needs_kernel
@pytest.mark.parametrize("share_kv_heads", [False, True], ids=["per-head", "shared"])
def test_a_pending_plan_decides_as_the_plan_sized_at_once(share_kv_heads):
    """defer_sizing: the key list is written before the host reads the counts; the device verdict and
    resolve() must give what the at-once path gives, at every boundary it has."""
    q, k, params = _gaussian_problem(8, 2, 300, 2.0, share_kv_heads)
    q, k = q.to(DEVICE), k.to(DEVICE)
    plan = anchor_identify(q, k, **params)
    density = plan.density()
    assert 0 < density < 1 and plan.indices.numel() > 0
    with pytest.raises(PlanBudgetExceeded) as exceeded:
        anchor_identify(q, k, **params, max_plan_bytes=plan_nbytes(plan))
    declared = sum(exceeded.value.kv_head_bytes)

    def pending(**extra: object) -> PendingPlan:
        result = anchor_identify(q, k, **params, defer_sizing=True, **extra)
        assert isinstance(result, PendingPlan)
        return result

    for extra in ({"max_plan_bytes": 2**40}, {"max_plan_bytes": declared},
                  {"max_plan_bytes": 2**40, "dense_above": min(1.0, density + 1e-6)}):
        held = pending(**extra)
        assert held.verdict.dtype == torch.int32 and held.verdict.tolist() == [1], extra
        assert held.plan.indices.numel() >= plan.indices.numel() and torch.equal(held.plan.offsets, plan.offsets)
        resolved = held.resolve()
        assert isinstance(resolved, StripePlan), extra
        assert torch.equal(resolved.offsets, plan.offsets) and torch.equal(resolved.indices, plan.indices), extra
    too_dense = pending(max_plan_bytes=2**40, dense_above=density - 1e-6)
    assert too_dense.verdict.tolist() == [0] and isinstance(too_dense.resolve(), DensePlan)
    over_budget = pending(max_plan_bytes=declared - 1)  # its buffer is too short: the write pass must stay inside
    assert over_budget.verdict.tolist() == [0] and over_budget.plan.indices.numel() < plan.indices.numel()
    with pytest.raises(PlanBudgetExceeded) as deferred:
        over_budget.resolve()
    assert deferred.value.kv_head_bytes == exceeded.value.kv_head_bytes
    nothing_fits = pending(max_plan_bytes=0)  # not even the offsets and keep bits
    assert nothing_fits.verdict.tolist() == [0] and nothing_fits.plan.indices.numel() == 0
    with pytest.raises(PlanBudgetExceeded):
        nothing_fits.resolve()
    # No budget, no bound on the buffer: the plan is sized at once.
    assert isinstance(anchor_identify(q, k, **params, defer_sizing=True), StripePlan)


# ---------------------------------------------------------------------------------------------
# Non-finite rows: a NaN row must not change what the other rows select
# ---------------------------------------------------------------------------------------------


def _segments_without(plan: StripePlan, rows: set[int], heads: set[int]) -> dict[int, set[int]]:
    """Selected keys of every segment whose group holds none of ``rows`` or whose plan head none of ``heads``."""
    kept = {}
    for segment in range(plan.offsets.numel() - 1):
        row_start, row_end, _, _ = plan.group_bounds(segment % plan.num_groups)
        head = segment // plan.num_groups % plan.plan_heads
        if head not in heads or not rows & set(range(row_start, row_end)):
            kept[segment] = _selected(plan, segment)
    return kept


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, interpreting inf x 0
@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # numpy, interpreting a NaN row's max
@pytest.mark.parametrize("share_kv_heads", [True, False], ids=["shared", "perhead"])
@pytest.mark.parametrize("name", NAMES)
def test_nan_query_rows_leave_the_other_rows_selection_alone(name: str, share_kv_heads: bool) -> None:
    case = dataclasses.replace(EDGE_CASE, group_blocks=1, share_kv_heads=share_kv_heads)  # a group is one block
    q, k = _inputs(case)
    tie = _kernel_tie(q, k, case) if name == "triton" else (TIE, 1000)  # from the finite inputs; tf32 on a GPU
    clean = _run(IDENTIFIERS[name], q, k, **case.params())
    # One NaN row in group 3 (rows 96-127) of head 1, and all of group 6 (rows 192-223) of head 2 infinite.
    q[0, 1, 100] = float("nan")
    q[0, 2, 192:224] = float("inf")
    plan = _run(IDENTIFIERS[name], q, k, **case.params())
    plan.validate()
    # The rule pools the finite rows only: group 3 still selects for head 1, group 6 nothing for head 2.
    _assert_same_plan(plan, _selection_rule(q, k, case, plan), _rule_margins(q, k, case, plan), tie)
    expected = anchor_identify_reference(q, k, **case.params())
    _assert_same_plan(plan, expected, _rule_margins(q, k, case, expected), tie)
    head_1, head_2 = (0, 0) if share_kv_heads else (1, 2)
    assert plan.counts()[0, head_1, 3] > 0 and plan.counts()[0, head_1, 3] >= clean.counts()[0, head_1, 3] // 2
    assert share_kv_heads or plan.counts()[0, head_2, 6] == 0
    # Groups (and, per head, heads) without a non-finite row select exactly what they did without them.
    touched_heads = {head_1, head_2}
    assert _segments_without(plan, {100, *range(192, 224)}, touched_heads) == _segments_without(
        clean, {100, *range(192, 224)}, touched_heads)


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # numpy, interpreting a NaN row's max
@pytest.mark.parametrize("name", NAMES)
def test_a_block_without_finite_rows_selects_nothing_and_a_nan_key_is_kept(name: str) -> None:
    case = dataclasses.replace(EDGE_CASE, num_q=1, share_kv_heads=False, theta=1e30)
    q, k = _inputs(case)
    q[0, 0, 192:256] = float("nan")  # all of group 3: its blocks have no finite row
    k[0, 0, 40] = float("nan")  # a candidate of groups 2.. (sink 16, local 32, 64-row groups)
    plan = _run(IDENTIFIERS[name], q, k, **case.params())
    plan.validate()
    counts = plan.counts()[0, 0]
    assert counts[3] == 0, "a group of NaN rows selects nothing beyond its windows"
    for group in (2, 4):  # theta 1e30 keeps every candidate of the finite groups, the NaN key included
        _, _, sink_end, local_start = plan.group_bounds(group)
        assert _selected(plan, group) == set(range(sink_end, local_start))
    # A NaN key is kept even where theta keeps nothing else: its NaN must reach the rows that would attend it.
    strict = _run(IDENTIFIERS[name], q, k, **case.params(theta=-1e30))
    assert [_selected(strict, g) for g in range(strict.num_groups)] == [set(), set(), {40}, set(), {40}]


# ---------------------------------------------------------------------------------------------
# Inputs the Triton identifier cannot take: the AnchorIdentifier uses the reference, warning once
# ---------------------------------------------------------------------------------------------

FALLBACKS = {
    # (q heads, kv heads, N, head dim, dtype, parameters, what the warning says)
    "head-dim-8": (2, 1, 300, 8, torch.float32, {}, r"head dim must be in \[16, 256\], got 8"),
    "head-dim-320": (2, 1, 300, 320, torch.float32, {}, "got 320"),
    "float64": (2, 1, 300, 64, torch.float64, {}, "dtype torch.float64"),
    "group-blocks-64-gqa-4": (4, 1, 1100, 64, torch.float32, {"block": 16, "group_blocks": 64},
                              "stacks 256 pooled rows per program.*use group_blocks <= 32"),
    "group-blocks-64-gqa-4-perhead": (4, 1, 1100, 64, torch.float32,
                                      {"block": 16, "group_blocks": 64, "share_kv_heads": False},
                                      "stacks 256 pooled rows per program.*use group_blocks <= 32"),
}


@needs_kernel  # elsewhere (CPU, TRITON_INTERPRET=0) the reference runs at once: no kernel tried, no warning
@pytest.mark.parametrize("num_q, num_kv, seq_len, head_dim, dtype, params, warning", FALLBACKS.values(),
                         ids=FALLBACKS.keys())
def test_the_anchor_identifier_falls_back_to_the_reference(num_q, num_kv, seq_len, head_dim, dtype, params, warning,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(anchor_pattern, "_WARNED", set())
    gen = torch.Generator().manual_seed(0)
    # On DEVICE, where the identifier tries the kernel; the expected plan is the reference's on the same tensors.
    q = torch.randn(1, num_q, seq_len, head_dim, generator=gen).to(device=DEVICE, dtype=dtype)
    k = torch.randn(1, num_kv, seq_len, head_dim, generator=gen).to(device=DEVICE, dtype=dtype)
    params = {"theta": 3.0, "block": 32, "sink": 16, "local": 16, "dense_above": 1.0, **params}
    identifier = ANCHOR.build(**params)
    ctx = AttentionContext.for_inputs(q, k)
    with pytest.warns(UserWarning, match=warning):
        plan = identifier.identify(q, k, ctx)
    expected = anchor_identify_reference(q, k, scale=ctx.scale, **identifier.params)
    assert torch.equal(plan.offsets, expected.offsets) and torch.equal(plan.indices, expected.indices)
    assert plan.indices.numel() > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per reason: the next layer's call is silent
        identifier.identify(q, k, ctx)


def test_the_suggested_group_blocks_stays_on_the_triton_identifier() -> None:
    for share_kv_heads in (True, False):
        reasons = not_supported_reasons(4, 1, 128, torch.bfloat16, block=128, group_blocks=64,
                                        share_kv_heads=share_kv_heads)
        assert len(reasons) == 1 and reasons[0].endswith("use group_blocks <= 32")
        assert not not_supported_reasons(4, 1, 128, torch.bfloat16, block=128, group_blocks=32,
                                         share_kv_heads=share_kv_heads)
    assert "no group_blocks fits" in not_supported_reasons(256, 1, 64, torch.float16, block=16, group_blocks=1,
                                                           share_kv_heads=True)[0]
