"""The block-scoring baselines (`xattention`, `flashprefill`, `block-topk`): each vectorised identifier against its
plain per-head reference, the extremes that give dense attention, non-finite rows, and the contract
every pattern keeps (dense fallback, parameter errors, plan budget)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch

from plan_factories import masked_attention
from sparse_prefill.dispatch import sparse_attention
from sparse_prefill.interfaces import AttentionContext, PatternSpec, PlanBudgetExceeded
from sparse_prefill.kernels.reference import dense_attention_reference
from sparse_prefill.patterns import _blocks
from sparse_prefill.patterns.block_topk import BLOCK_TOPK, block_topk_lists, block_topk_mask_reference, block_topk_masks
from sparse_prefill.patterns.flashprefill import (
    FLASHPREFILL,
    flashprefill_block_mask_reference,
    flashprefill_block_masks,
)
from sparse_prefill.patterns.xattention import XATTENTION, xattention_block_mask_reference, xattention_block_masks
from sparse_prefill.plan import BlockPlan, DensePlan, PendingPlan
from sparse_prefill.policy import PolicyError, load_policy


@dataclass(frozen=True)
class Case:
    """One pattern under test: its spec, small parameters, the reference and vectorised masks, and
    the parameter values that keep everything (dense) and little."""

    spec: PatternSpec
    small: dict[str, Any]
    reference: Callable[..., torch.Tensor]  # (q [N, D], k [N, D], scale, **params) -> [nb, nb]
    vectorised: Callable[..., torch.Tensor]  # (q [B, Hq, N, D], k [B, Hkv, N, D], scale, **params)
    everything: dict[str, Any]
    sparse: dict[str, Any]
    bad_value: tuple[str, Any]

    def selection(self, params: dict[str, Any]) -> dict[str, Any]:
        return {key: value for key, value in params.items() if key not in ("dense_above", "float8_scores")}


CASES = {
    "xattention": Case(XATTENTION, dict(threshold=0.9, stride=4, block=16, dense_above=1.0, float8_scores=False),
                       xattention_block_mask_reference, xattention_block_masks,
                       everything=dict(threshold=1.0), sparse=dict(threshold=0.3), bad_value=("threshold", 0.0)),
    "flashprefill": Case(FLASHPREFILL, dict(alpha=0.18, block=16, sink=1, window=1, last=0, dense_above=1.0),
                         flashprefill_block_mask_reference, flashprefill_block_masks,
                         everything=dict(alpha=0.0), sparse=dict(alpha=0.5), bad_value=("alpha", 1.5)),
    "block-topk": Case(BLOCK_TOPK, dict(blocks=4, block=16, dense_above=1.0), block_topk_mask_reference,
                       block_topk_masks, everything=dict(blocks=1000), sparse=dict(blocks=3), bad_value=("blocks", 0)),
}


def _inputs(seed: int, batch: int = 1, hq: int = 4, hkv: int = 2, n: int = 160, d: int = 32,
            dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, h, n, d, generator=generator).to(dtype) for h in (hq, hkv, hkv))


def _reference_masks(case: Case, q: torch.Tensor, k: torch.Tensor, scale: float, params: dict) -> torch.Tensor:
    group = q.shape[1] // k.shape[1]
    return torch.stack([torch.stack([case.reference(q[b, h], k[b, h // group], scale, **case.selection(params))
                                     for h in range(q.shape[1])]) for b in range(q.shape[0])])


def _plan_blocks(plan: BlockPlan) -> torch.Tensor:
    """[B, H, nb, nb] bool from the plan's lists."""
    nb = plan.num_blocks
    blocks = torch.zeros(plan.batch * plan.heads * nb, nb, dtype=torch.bool)
    for segment in range(blocks.shape[0]):
        blocks[segment, plan.indices[plan.offsets[segment]:plan.offsets[segment + 1]].long()] = True
    return blocks.view(plan.batch, plan.heads, nb, nb)


SHAPES = {  # (batch, q heads, kv heads, N, head dim, parameter changes)
    "gqa-ragged": (1, 4, 2, 150, 32, {}),
    "batch2-mha": (2, 3, 3, 96, 16, {}),
    "batch2-gqa4-ragged": (2, 4, 1, 77, 32, {"block": 32}),
    "shorter-than-a-block": (1, 2, 1, 10, 16, {}),
    "sparse": (1, 2, 2, 200, 32, "sparse"),
}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", CASES)
def test_vectorised_masks_and_plan_equal_the_reference(name: str, shape: str) -> None:
    case = CASES[name]
    batch, hq, hkv, n, d, changes = SHAPES[shape]
    params = {**case.small, **(case.sparse if changes == "sparse" else changes)}
    q, k, _ = _inputs(n + hq, batch, hq, hkv, n, d)
    scale = d ** -0.5
    expected = _reference_masks(case, q, k, scale, params)
    assert torch.equal(case.vectorised(q, k, scale, **case.selection(params)), expected)
    assert not bool(expected.triu(1).any()) and bool(expected.diagonal(dim1=-2, dim2=-1).all())
    plan = case.spec.build(**params).identify(q, k, AttentionContext.for_inputs(q, k))
    assert isinstance(plan, BlockPlan) and plan.heads == hq
    plan.validate()
    assert torch.equal(_plan_blocks(plan), expected)


@pytest.mark.parametrize("name", CASES)
def test_the_extreme_keeps_every_block_and_gives_dense_attention(name: str) -> None:
    case = CASES[name]
    q, k, v = _inputs(3, batch=2, n=130)
    identifier = case.spec.build(**{**case.small, **case.everything})
    plan = identifier.identify(q, k, AttentionContext.for_inputs(q, k))
    assert isinstance(plan, BlockPlan) and plan.density() == pytest.approx(1.0)
    out, _ = sparse_attention(q, k, v, identifier)
    expected, _ = dense_attention_reference(q, k, v, q.shape[-1] ** -0.5)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", CASES)
def test_a_focused_head_keeps_few_blocks_and_the_hot_one(name: str) -> None:
    """Every query attends key 40 alone: its block is kept by every later query block, little else."""
    case = CASES[name]
    generator = torch.Generator().manual_seed(1)
    q = torch.randn(1, 1, 160, 32, generator=generator) * 0.1
    k = torch.randn(1, 1, 160, 32, generator=generator) * 0.1
    q[..., 0] += 6.0
    k[0, 0, 40, 0] = 12.0
    mask = case.vectorised(q, k, 32 ** -0.5, **case.selection({**case.small, **case.sparse}))[0, 0]
    assert bool(mask[40 // 16:, 40 // 16].all())
    assert int(mask.sum(dim=1).max()) <= 3  # the hot block, the first and the diagonal


@pytest.mark.parametrize("name", CASES)
def test_sparse_output_is_attention_over_the_plan(name: str) -> None:
    case = CASES[name]
    q, k, v = _inputs(4, n=144)
    q[..., 0] += 3.0  # every query leans towards keys 20 and 70: a sparse plan
    k[..., (20, 70), 0] += 10.0
    identifier = case.spec.build(**{**case.small, **case.sparse})
    ctx = AttentionContext.for_inputs(q, k)
    plan = identifier.identify(q, k, ctx)
    assert plan.density() < 1
    expected, _ = masked_attention(q, k, v, plan.to_dense(), ctx.scale)
    out, _ = sparse_attention(q, k, v, identifier, ctx)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", CASES)
def test_nan_query_rows_leave_the_other_blocks_alone_and_a_nan_key_is_kept(name: str) -> None:
    case = CASES[name]
    params = case.selection({**case.small, **case.sparse})
    q, k, _ = _inputs(7, n=160)
    clean = case.vectorised(q, k, 32 ** -0.5, **params)
    q[0, 1, 100] = float("nan")  # query block 6 (rows 96-111) of head 1
    q[0, 2, 48:64] = float("inf")  # all of query block 3 of head 2
    poisoned = case.vectorised(q, k, 32 ** -0.5, **params)
    assert torch.equal(poisoned, _reference_masks(case, q, k, 32 ** -0.5, params))
    touched = torch.zeros_like(clean)
    touched[0, 1, 6] = touched[0, 2, 3] = True
    assert torch.equal(poisoned[~touched], clean[~touched])
    assert int(poisoned[0, 2, 3].sum()) <= 2, "a block without finite rows keeps only the first and diagonal"
    k[0, 0, 40] = float("nan")  # key block 2 of KV head 0: query heads 0 and 1
    with_nan_key = case.vectorised(q, k, 32 ** -0.5, **params)
    assert bool(with_nan_key[0, :2, 2:, 2].all())
    out, _ = sparse_attention(q, k, k, case.spec.build(**{**case.small, **case.sparse}))
    assert bool(out[0, :2, 40:].isnan().all()) and bool(out[0, 2:, 96:].isfinite().all())


@pytest.mark.parametrize("name", CASES)
def test_dense_above_falls_back_unless_the_context_forbids_it(name: str) -> None:
    case = CASES[name]
    q, k, _ = _inputs(5)
    identifier = case.spec.build(**{**case.small, "dense_above": 0.05})
    assert isinstance(identifier.identify(q, k, AttentionContext.for_inputs(q, k)), DensePlan)
    assert isinstance(identifier.identify(q, k, AttentionContext.for_inputs(q, k, dense_fallback=False)), BlockPlan)


@pytest.mark.parametrize("name", CASES)
def test_policy_and_parameter_errors(name: str, tmp_path) -> None:
    case = CASES[name]
    key, bad = case.bad_value
    policy = load_policy({"default": {"pattern": name, **case.small}})
    assert policy.default.pattern == name and policy.default.as_dict() == case.small
    path = tmp_path / "p.yaml"
    path.write_text(f"default:\n  pattern: {name}\n  {key}: {bad}\n")
    with pytest.raises(PolicyError, match=key):
        load_policy(str(path))
    with pytest.raises(ValueError, match=key):
        case.spec.build(**{key: bad})


@pytest.mark.parametrize("name", CASES)
def test_a_plan_over_the_budget_runs_in_head_chunks_with_the_same_answer(name: str) -> None:
    case = CASES[name]
    q, k, v = _inputs(6, n=160)
    identifier = case.spec.build(**{**case.small, **case.sparse})
    with pytest.raises(PlanBudgetExceeded) as exceeded:
        identifier.identify(q, k, AttentionContext.for_inputs(q, k, plan_budget=64))
    assert len(exceeded.value.kv_head_bytes) == 2 and len(exceeded.value.query_head_bytes) == 4
    expected, _ = sparse_attention(q, k, v, identifier)
    chunked, _ = sparse_attention(q, k, v, identifier, max_plan_bytes=64)
    torch.testing.assert_close(chunked, expected, atol=1e-6, rtol=1e-5)


def _plan_fields(plan: BlockPlan) -> tuple:
    return plan.batch, plan.heads, plan.seq_len, plan.block_size, plan.offsets.tolist(), plan.indices.tolist()


@pytest.mark.parametrize("blocks", [1, 2, 4, 9, 12, 50])
@pytest.mark.parametrize("n", [10, 150, 177])
def test_block_topk_lists_hold_the_masks_blocks_in_order_and_give_the_same_plan(blocks: int, n: int) -> None:
    q, k, _ = _inputs(blocks + n, batch=2, n=n)
    lists = block_topk_lists(q, k, 32 ** -0.5, blocks=blocks, block=16)
    num_blocks = -(-n // 16)
    assert lists.shape[-1] == min(blocks, num_blocks + 1)
    listed = lists < num_blocks
    assert not bool((listed[..., 1:] & ~listed[..., :-1]).any()), "empty places come last"
    assert bool((lists[..., 1:] > lists[..., :-1])[listed[..., 1:]].all()), "ascending, unique"
    mask = torch.zeros(*lists.shape[:-1], num_blocks + 1, dtype=torch.bool).scatter_(-1, lists, True)[..., :-1]
    expected = block_topk_masks(q, k, 32 ** -0.5, blocks=blocks, block=16)
    assert torch.equal(mask, expected)
    ctx = AttentionContext.for_inputs(q, k, dense_fallback=False)
    from_lists = _blocks.list_plan(lists, n, 16, k.shape[1], ctx, dense_above=1.0)
    from_mask = _blocks.block_plan(expected, n, 16, k.shape[1], ctx, dense_above=1.0)
    assert _plan_fields(from_lists) == _plan_fields(from_mask)
    assert from_lists.density() == pytest.approx(from_mask.density())


def test_list_plan_takes_any_sorted_lists_and_says_when_told_to_step_aside() -> None:
    # Rows without their diagonal block, empty rows, a ragged last block: the same plan and density as the mask's.
    generator = torch.Generator().manual_seed(11)
    num_blocks, n = 7, 100
    mask = (torch.rand(2, 3, num_blocks, num_blocks, generator=generator) < 0.4) & torch.ones(
        num_blocks, num_blocks, dtype=torch.bool).tril()
    mask[0, 1, 4] = False
    positions = torch.arange(num_blocks).expand(*mask.shape)
    lists = torch.where(mask, positions, num_blocks).sort(dim=-1).values
    ctx = AttentionContext(scale=1.0, num_q_heads=3, num_kv_heads=3, seq_len=n,
                           dense_fallback=False)
    from_lists = _blocks.list_plan(lists, n, 16, 3, ctx, dense_above=1.0)
    from_mask = _blocks.block_plan(mask, n, 16, 3, ctx, dense_above=1.0)
    assert _plan_fields(from_lists) == _plan_fields(from_mask)
    assert from_lists.density() == pytest.approx(from_mask.density())
    assert _blocks.list_plan(lists, n, 16, 3, ctx, dense_above=1.0, unless=torch.tensor(True)) is None
    budget = AttentionContext(scale=1.0, num_q_heads=3, num_kv_heads=3, seq_len=n, plan_budget=16)
    with pytest.raises(PlanBudgetExceeded):
        _blocks.list_plan(lists, n, 16, 3, budget, dense_above=1.0)


@pytest.mark.parametrize("route", ["mask", "lists"])
def test_a_pending_block_plan_decides_as_the_plan_sized_at_once(route: str) -> None:
    """defer_sizing: the key list is written before the host reads the counts; the device verdict and
    resolve() must give what the sized path gives at each of its boundaries (density, budget, nothing fits)."""
    generator = torch.Generator().manual_seed(5)
    num_blocks, n, heads = 7, 100, 3
    mask = (torch.rand(2, heads, num_blocks, num_blocks, generator=generator) < 0.5) & torch.ones(
        num_blocks, num_blocks, dtype=torch.bool).tril()
    lists = torch.where(mask, torch.arange(num_blocks).expand(*mask.shape), num_blocks).sort(dim=-1).values

    def plan_for(ctx: AttentionContext, dense_above: float, unless: torch.Tensor | None = None):
        if route == "mask":
            return _blocks.block_plan(mask, n, 16, heads, ctx, dense_above)
        return _blocks.list_plan(lists, n, 16, heads, ctx, dense_above, unless=unless)

    base = AttentionContext(scale=1.0, num_q_heads=heads, num_kv_heads=heads, seq_len=n)
    sized = plan_for(base, dense_above=1.0)
    density = sized.density()
    assert isinstance(sized, BlockPlan) and 0 < density < 1
    with pytest.raises(PlanBudgetExceeded) as exceeded:
        plan_for(dataclasses.replace(base, plan_budget=16), dense_above=1.0)
    enough = sum(exceeded.value.kv_head_bytes) + 8  # enforce_plan_budget's 8 bytes beside the lists

    def pending(budget: int, dense_above: float, unless: torch.Tensor | None = None) -> PendingPlan:
        result = plan_for(dataclasses.replace(base, plan_budget=budget, defer_sizing=True), dense_above, unless)
        assert isinstance(result, PendingPlan) and result.verdict.dtype == torch.int32
        return result

    for budget, dense_above in ((2**40, 1.0), (enough, 1.0), (2**40, density + 1e-9)):
        held = pending(budget, dense_above)
        assert held.verdict.tolist() == [1], (budget, dense_above)
        assert torch.equal(held.plan.offsets, sized.offsets)
        assert held.plan.indices.numel() >= sized.indices.numel()
        assert _plan_fields(held.resolve()) == _plan_fields(sized), (budget, dense_above)
    too_dense = pending(2**40, density - 1e-9)
    assert too_dense.verdict.tolist() == [0] and isinstance(too_dense.resolve(), DensePlan)
    over_budget = pending(enough - 1, 1.0)  # its buffer one entry short: the verdict stops the executor
    assert over_budget.verdict.tolist() == [0] and over_budget.plan.indices.numel() < sized.indices.numel()
    with pytest.raises(PlanBudgetExceeded) as deferred:
        over_budget.resolve()
    assert deferred.value.kv_head_bytes == exceeded.value.kv_head_bytes
    nothing_fits = pending(0, 1.0)
    assert nothing_fits.verdict.tolist() == [0] and nothing_fits.plan.indices.numel() == 0
    with pytest.raises(PlanBudgetExceeded):
        nothing_fits.resolve()
    if route == "lists":  # the route a caller asked for cannot wait: dense attention, which is exact, and why
        stepped_aside = pending(2**40, 1.0, unless=torch.tensor(True))
        resolved = stepped_aside.resolve()
        assert stepped_aside.verdict.tolist() == [0] and isinstance(resolved, DensePlan) and resolved.reason
        assert pending(2**40, 1.0, unless=torch.tensor(False)).verdict.tolist() == [1]


def test_max_listed_bounds_every_plan_no_denser_than_its_limit() -> None:
    """The pending buffer's capacity: no block plan within ``dense_above`` lists more, whatever its shape."""
    generator = torch.Generator().manual_seed(6)
    for n, block in ((100, 16), (97, 32), (16, 16), (300, 64)):
        num_blocks = -(-n // block)
        causal = torch.ones(num_blocks, num_blocks, dtype=torch.bool).tril()
        ctx = AttentionContext(scale=1.0, num_q_heads=2, num_kv_heads=2, seq_len=n, dense_fallback=False)
        for keep in (0.05, 0.3, 0.7, 1.0):
            mask = (torch.rand(1, 2, num_blocks, num_blocks, generator=generator) < keep) & causal
            plan = _blocks.block_plan(mask, n, block, 2, ctx, dense_above=1.0)
            for limit in (plan.density(), plan.density() + 0.05, 1.0):
                assert plan.indices.numel() <= BlockPlan.max_listed(1, 2, n, block, limit), (n, block, keep)


def test_block_topk_with_a_nan_key_keeps_its_block_on_every_causal_row() -> None:
    q, k, _ = _inputs(12, n=160)
    k[0, 1, 70] = float("nan")  # key block 4 of KV head 1: query heads 2 and 3
    plan = BLOCK_TOPK.build(blocks=3, block=16, dense_above=1.0).identify(q, k, AttentionContext.for_inputs(q, k))
    blocks = _plan_blocks(plan)
    assert bool(blocks[0, 2:, 4:, 4].all()) and not bool(blocks[0, :2, 5:, 4].all())
    assert torch.equal(blocks, block_topk_masks(q, k, 32 ** -0.5, blocks=3, block=16))


def test_block_topk_finds_an_infinite_key_and_takes_the_exact_route_where_finite_keys_overflow_their_mean() -> None:
    """The identifier reads bad keys off k's float32 block means: an infinite key makes its block's mean
    non-finite (kept on every causal row); finite keys whose sum passes float32's range do too, and then the
    mask route gives the reference's plan, that block not forced."""
    q, k, _ = _inputs(13, n=160)
    k[0, 0, 20] = float("-inf")  # key block 1 of KV head 0
    k[0, 1, 96:112] = 3e38  # key block 6 of KV head 1: finite keys, an infinite sum
    plan = BLOCK_TOPK.build(blocks=3, block=16, dense_above=1.0).identify(q, k, AttentionContext.for_inputs(q, k))
    blocks = _plan_blocks(plan)
    assert torch.equal(blocks, block_topk_masks(q, k, 32 ** -0.5, blocks=3, block=16))
    assert bool(blocks[0, :2, 1:, 1].all()) and not bool(blocks[0, 2:, 7:, 6].all())


def test_xattention_stride_must_divide_every_block() -> None:
    with pytest.raises(ValueError, match=r"parameter 'stride'.*must be one of 1, 2, 4, 8, 16"):
        XATTENTION.build(block=16, stride=12)
    with pytest.raises(PolicyError, match=r"default\.stride"):
        load_policy({"default": {"pattern": "xattention", "stride": 32}})
    with pytest.raises(ValueError, match=r"block \(24\) must be a multiple of stride \(16\)"):
        xattention_block_masks(*_inputs(0)[:2], 1.0, block=24, stride=16, threshold=0.9)


def test_flashprefill_keeps_sink_window_and_last_blocks_whatever_alpha() -> None:
    q, k, _ = _inputs(8, n=160)  # 10 blocks of 16
    mask = flashprefill_block_masks(q, k, 32 ** -0.5, alpha=1.0, block=16, sink=2, window=3, last=2)
    causal = torch.ones(10, 10, dtype=torch.bool).tril()
    assert bool(mask[..., :, :2][..., causal[:, :2]].all())  # sink: the first two key blocks
    for distance in range(3):  # window: the diagonal and the two blocks before it
        assert bool(mask.diagonal(offset=-distance, dim1=-2, dim2=-1).all())
    assert bool(mask[..., 8:, :].eq(causal[8:]).all())  # the last two query blocks: every key block
    # alpha 1 adds only each query block's best-scored block (ties aside) to the sink and the window
    assert int(mask[..., 5, :].sum(dim=-1).max()) <= 6


@pytest.mark.parametrize("name", CASES)
def test_scoring_in_the_smallest_row_chunks_changes_nothing(name: str, monkeypatch) -> None:
    case = CASES[name]
    q, k, _ = _inputs(9, batch=2, n=141)
    params = case.selection(case.small)
    whole = case.vectorised(q, k, 32 ** -0.5, **params)
    monkeypatch.setattr("sparse_prefill.patterns._blocks.CHUNK_ELEMENTS", 1)  # one query block per chunk
    assert torch.equal(case.vectorised(q, k, 32 ** -0.5, **params), whole)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_means_and_nonfinite_blocks_read_the_input_in_place(dtype: torch.dtype) -> None:
    # A Hugging Face layout ([B, N, H, D] seen as [B, H, N, D]) and a partial last block: each block's mean of
    # the float32 rows, and exactly the blocks holding a NaN or an infinity.
    generator = torch.Generator().manual_seed(5)
    x = (torch.randn(2, 70, 3, 8, generator=generator) * 3).to(dtype).transpose(1, 2)
    x[1, 2, 65, 4] = float("nan")
    x[0, 1, 3, 0] = float("-inf")
    expected = torch.stack([x[..., start:start + 16, :].float().mean(dim=-2) for start in range(0, 70, 16)], dim=-2)
    means = _blocks.block_means(x, 16)
    assert means.dtype == torch.float32 and means.shape == (2, 3, 5, 8)
    assert torch.allclose(means, expected, equal_nan=True, atol=1e-6)
    bad = _blocks.nonfinite_key_blocks(x, 16)
    assert bad.nonzero().tolist() == [[0, 1, 0], [1, 2, 4]]
