"""The `flexprefill` baseline: block budgets, query-aware heads, the vectorised masks against the per-head
reference, plans as whole key blocks, execution."""

from __future__ import annotations

import pytest
import torch

from plan_factories import masked_attention
from sparse_prefill.dispatch import sparse_attention
from sparse_prefill.interfaces import AttentionContext, PlanBudgetExceeded
from sparse_prefill.kernels.reference import dense_attention_reference
from sparse_prefill.patterns.flexprefill import (
    FLEXPREFILL,
    covering_count,
    flexprefill_block_mask_reference,
    flexprefill_block_masks,
)
from sparse_prefill.plan import BlockPlan, DensePlan
from sparse_prefill.policy import PolicyError, load_policy

SMALL = dict(gamma=0.9, tau=0.1, block=16, min_budget=16, dense_above=1.0)


def _inputs(seed: int, batch: int = 1, hq: int = 4, hkv: int = 2, n: int = 160, d: int = 32,
            dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, h, n, d, generator=generator).to(dtype) for h in (hq, hkv, hkv))


def _focused(n: int = 160, d: int = 32, hot: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    """One head whose queries all attend key ``hot`` (and their own diagonal a little)."""
    generator = torch.Generator().manual_seed(1)
    q = torch.randn(n, d, generator=generator) * 0.1
    k = torch.randn(n, d, generator=generator) * 0.1
    q[:, 0] += 6.0
    k[hot, 0] = 12.0
    return q, k


def test_covering_count_is_the_entries_within_gamma_plus_one() -> None:
    assert covering_count(torch.tensor([0.2, 0.5, 0.3]), 0.75) == 2
    assert covering_count(torch.tensor([0.2, 0.5, 0.3]), 0.5) == 2
    assert covering_count(torch.tensor([0.2, 0.5, 0.3]), 0.4) == 1


@pytest.mark.parametrize("n, block", [(160, 16), (150, 32), (64, 16), (10, 16)])
def test_plan_lists_the_blocks_of_the_mask(n: int, block: int) -> None:
    q, k, _ = _inputs(n, n=n)
    params = {**SMALL, "block": block}
    ctx = AttentionContext.for_inputs(q, k)
    plan = FLEXPREFILL.build(**params).identify(q, k, ctx)
    assert isinstance(plan, BlockPlan)
    plan.validate()
    assert (plan.heads, plan.block_size) == (4, block)
    for h in range(4):
        mask = flexprefill_block_mask_reference(q[0, h], k[0, h // 2], ctx.scale, params["gamma"], params["tau"], block,
                                                params["min_budget"])
        assert bool(mask.diagonal().all()) and bool(mask[:, 0].all())  # diagonal and first key block, always
        assert not bool(mask.triu(1).any())  # block-causal
        num_blocks = mask.shape[0]
        for g in range(num_blocks):
            segment = h * num_blocks + g
            listed = plan.indices[plan.offsets[segment]: plan.offsets[segment + 1]]
            assert torch.equal(listed.long(), torch.nonzero(mask[g, :g + 1]).flatten())


def test_focused_attention_keeps_few_blocks_and_the_minimum_budget() -> None:
    q, k = _focused()
    scale = 32 ** -0.5
    mask = flexprefill_block_mask_reference(q, k, scale, gamma=0.9, tau=0.0, block=16, min_budget=32)
    assert bool(mask[:, 40 // 16][40 // 16:].all())  # the hot key's block, for every query block after it
    per_row = mask.sum(dim=1)
    # two vertical blocks (the budget's minimum, 32 keys) and two diagonal blocks at most, per query block
    assert int(per_row.max()) <= 4 and int(per_row[-1]) >= 2


def test_tau_decides_which_heads_are_query_aware() -> None:
    """tau 0: no head is query-aware, so only budgeted lines; tau 1: every head adds its pooled blocks."""
    q, k, _ = _inputs(2, hq=1, hkv=1, n=160)
    scale = 32 ** -0.5
    lines_only = flexprefill_block_mask_reference(q[0, 0], k[0, 0], scale, gamma=0.5, tau=0.0, block=16, min_budget=16)
    query_aware = flexprefill_block_mask_reference(q[0, 0], k[0, 0], scale, gamma=0.5, tau=1.0, block=16, min_budget=16)
    minimum = flexprefill_block_mask_reference(q[0, 0], k[0, 0], scale, gamma=1e-6, tau=1.0, block=16, min_budget=16)
    assert int(minimum.sum()) <= int(query_aware.sum())
    assert not torch.equal(lines_only, query_aware)


def test_gamma_one_keeps_every_block_and_gives_dense_attention() -> None:
    q, k, v = _inputs(3, n=130)
    identifier = FLEXPREFILL.build(**{**SMALL, "gamma": 1.0, "min_budget": 10_000})
    plan = identifier.identify(q, k, AttentionContext.for_inputs(q, k))
    assert plan.density() == pytest.approx(1.0)
    out, _ = sparse_attention(q, k, v, identifier)
    expected, _ = dense_attention_reference(q, k, v, q.shape[-1] ** -0.5)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_sparse_output_is_attention_over_the_plan() -> None:
    q, k, v = _inputs(4, n=144, dtype=torch.bfloat16)
    identifier = FLEXPREFILL.build(**{**SMALL, "gamma": 0.6, "tau": 0.0})
    ctx = AttentionContext.for_inputs(q, k)
    plan = identifier.identify(q, k, ctx)
    assert plan.density() < 1
    expected, _ = masked_attention(q, k, v, plan.to_dense(), ctx.scale)
    out, _ = sparse_attention(q, k, v, identifier, ctx)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)


def test_dense_above_falls_back_unless_the_context_forbids_it() -> None:
    q, k, _ = _inputs(5)
    identifier = FLEXPREFILL.build(**{**SMALL, "dense_above": 0.05})
    assert isinstance(identifier.identify(q, k, AttentionContext.for_inputs(q, k)), DensePlan)
    assert isinstance(identifier.identify(q, k, AttentionContext.for_inputs(q, k, dense_fallback=False)), BlockPlan)


def test_policy_and_parameter_errors(tmp_path) -> None:
    policy = load_policy({"default": {"pattern": "flexprefill", "gamma": 0.95}})
    assert policy.default.as_dict()["gamma"] == 0.95
    path = tmp_path / "fp.yaml"
    path.write_text("default:\n  pattern: flexprefill\n  gamma: 0\n")
    with pytest.raises(PolicyError, match="gamma"):
        load_policy(str(path))
    with pytest.raises(ValueError, match="tau"):
        FLEXPREFILL.build(tau=1.5)


def test_a_plan_over_the_budget_runs_in_head_chunks_with_the_same_answer() -> None:
    q, k, v = _inputs(6, n=160)
    identifier = FLEXPREFILL.build(**{**SMALL, "gamma": 0.6, "tau": 0.0})
    with pytest.raises(PlanBudgetExceeded) as exceeded:
        identifier.identify(q, k, AttentionContext.for_inputs(q, k, plan_budget=64))
    assert len(exceeded.value.kv_head_bytes) == 2 and len(exceeded.value.query_head_bytes) == 4
    expected, _ = sparse_attention(q, k, v, identifier)
    chunked, _ = sparse_attention(q, k, v, identifier, max_plan_bytes=64)
    torch.testing.assert_close(chunked, expected, atol=1e-6, rtol=1e-5)  # same plans; head tiles may differ


EQUAL_CASES = {  # (batch, q heads, kv heads, N, head dim, parameter changes)
    "gqa-ragged": (1, 4, 2, 150, 32, {}),
    "batch2-gqa4-ragged": (2, 4, 1, 77, 16, {"block": 32}),
    "batch2-mha": (2, 3, 3, 96, 16, {"tau": 0.3}),
    "every-head-query-aware": (1, 4, 2, 160, 16, {"tau": 1.0, "gamma": 0.5}),
    "no-head-query-aware": (1, 4, 2, 160, 16, {"tau": 0.0, "gamma": 0.6, "min_budget": 0}),
    "everything": (2, 2, 1, 130, 16, {"gamma": 1.0, "min_budget": 10_000}),
    "tiny-gamma": (1, 4, 2, 160, 16, {"gamma": 1e-6, "tau": 1.0}),
    "shorter-than-a-block": (1, 2, 1, 10, 16, {}),
}


def _reference_masks(q: torch.Tensor, k: torch.Tensor, scale: float, params: dict) -> torch.Tensor:
    group = q.shape[1] // k.shape[1]
    selection = {key: value for key, value in params.items() if key != "dense_above"}
    return torch.stack([torch.stack([flexprefill_block_mask_reference(q[b, h], k[b, h // group], scale, **selection)
                                     for h in range(q.shape[1])]) for b in range(q.shape[0])])


@pytest.mark.parametrize("case", EQUAL_CASES)
def test_vectorised_masks_and_plan_equal_the_per_head_reference(case: str) -> None:
    batch, hq, hkv, n, d, changes = EQUAL_CASES[case]
    params = {**SMALL, **changes}
    q, k, _ = _inputs(n + hq, batch, hq, hkv, n, d)
    ctx = AttentionContext.for_inputs(q, k)
    expected = _reference_masks(q, k, ctx.scale, params)
    selection = {key: value for key, value in params.items() if key != "dense_above"}
    assert torch.equal(flexprefill_block_masks(q, k, ctx.scale, **selection), expected)
    plan = FLEXPREFILL.build(**params).identify(q, k, ctx)
    assert isinstance(plan, BlockPlan)
    plan.validate()
    for segment, (b, h, g) in enumerate(torch.cartesian_prod(*(torch.arange(x) for x in expected.shape[:3])).tolist()):
        listed = plan.indices[plan.offsets[segment]: plan.offsets[segment + 1]].long()
        assert torch.equal(listed, torch.nonzero(expected[b, h, g, :g + 1]).flatten()), (b, h, g)


def test_a_nan_query_row_leaves_the_other_heads_alone() -> None:
    q, k, _ = _inputs(12, batch=2, n=150)
    params = {**SMALL, "tau": 0.3}
    selection = {key: value for key, value in params.items() if key != "dense_above"}
    clean = flexprefill_block_masks(q, k, 32 ** -0.5, **selection)
    q[1, 2, -3] = float("nan")
    poisoned = flexprefill_block_masks(q, k, 32 ** -0.5, **selection)
    assert torch.equal(poisoned, _reference_masks(q, k, 32 ** -0.5, params))
    others = torch.ones(2, 4, dtype=torch.bool)
    others[1, 2] = False
    assert torch.equal(poisoned[others], clean[others])
