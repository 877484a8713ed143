"""The `vertical-slash` baseline (MInference): line scores, plans against the rule, the vectorised identifier
against its per-head reference, execution, errors."""

from __future__ import annotations

import pytest
import torch

from plan_factories import masked_attention
from sparse_prefill.dispatch import sparse_attention
from sparse_prefill.interfaces import AttentionContext, PlanBudgetExceeded
from sparse_prefill.kernels.reference import dense_attention_reference
from sparse_prefill.patterns.vertical_slash import VERTICAL_SLASH, line_scores
from sparse_prefill.patterns.vertical_slash_reference import vertical_slash_plan_reference
from sparse_prefill.plan import DensePlan, StripePlan
from sparse_prefill.policy import PolicyError, load_policy
from sparse_prefill.registry import get_pattern

SMALL = dict(vertical=12, slash=9, last_q=16, block=16, sink=4, local=8, dense_above=1.0)


def _inputs(seed: int, batch: int = 1, hq: int = 4, hkv: int = 2, n: int = 160, d: int = 32,
            dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, h, n, d, generator=generator).to(dtype) for h in (hq, hkv, hkv))
    return q, k, v


def _brute_force_lines(q: torch.Tensor, k: torch.Tensor, scale: float, last_q: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Column and diagonal sums of the last rows' softmax, one (row, key) pair at a time."""
    n = k.shape[0]
    probs = torch.zeros(n, n)
    for row in range(n - last_q, n):
        probs[row, : row + 1] = torch.softmax((q[row] @ k[: row + 1].T) * scale, dim=-1)
    vertical = probs.sum(dim=0)
    slash = torch.tensor([sum(float(probs[row, row - offset]) for row in range(max(offset, n - last_q), n))
                          for offset in range(n)])
    return vertical, slash


def _expected_lists(q: torch.Tensor, k: torch.Tensor, params: dict, scale: float) -> list[list[set[int]]]:
    """Per (plan head, group), the keys the rule lists for one sequence: the top columns outside the
    initial window and the keys the group's rows reach along the top diagonals outside the local one,
    inside the group's candidates."""
    num_q, n = q.shape[0], q.shape[1]
    group = num_q // k.shape[0]
    heads = [range(h * group, (h + 1) * group) for h in range(k.shape[0])] if params.get("share_kv_heads") else \
        [[h] for h in range(num_q)]
    plan = StripePlan.empty(1, len(heads), n, params["block"], params["sink"], params["local"], "cpu")
    lists = []
    for query_heads in heads:
        vertical, slash = torch.zeros(n), torch.zeros(n)
        for h in query_heads:
            head_vertical, head_slash = _brute_force_lines(q[h], k[h // group], scale, params["last_q"])
            vertical, slash = vertical + head_vertical, slash + head_slash
        sink, local = params["sink"], params["local"]
        columns = set((sink + torch.topk(vertical[sink:], min(params["vertical"], n - sink)).indices).tolist())
        offsets = set((local + 1 + torch.topk(slash[local + 1:], min(params["slash"], n - local - 1)).indices).tolist())
        per_group = []
        for g in range(plan.num_groups):
            row_start, row_end, sink_end, local_start = plan.group_bounds(g)
            reached = {row - o for row in range(row_start, row_end) for o in offsets} | columns
            per_group.append({key for key in reached if sink_end <= key < local_start})
        lists.append(per_group)
    return lists


def _listed(plan: StripePlan, segment: int) -> set[int]:
    return set(plan.indices[plan.offsets[segment]: plan.offsets[segment + 1]].tolist())


def test_line_scores_are_the_last_rows_attention_summed_per_column_and_diagonal() -> None:
    q, k, _ = _inputs(0, hq=1, hkv=1, n=50)
    scale = 32 ** -0.5
    vertical, slash = line_scores(q[0, 0, -7:], k[0, 0], scale)
    expected_vertical, expected_slash = _brute_force_lines(q[0, 0], k[0, 0], scale, 7)
    torch.testing.assert_close(vertical, expected_vertical, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(slash, expected_slash, atol=1e-5, rtol=1e-5)
    assert float(vertical.sum()) == pytest.approx(7) and float(slash.sum()) == pytest.approx(7)


@pytest.mark.parametrize("n, block, share_kv_heads", [(160, 16, False), (160, 32, True), (131, 16, False), (97, 32, True)])
def test_plan_lists_what_the_rule_selects(n: int, block: int, share_kv_heads: bool) -> None:
    """Whole groups list exactly the rule's keys; a sequence's last, shorter group at least them."""
    params = {**SMALL, "block": block, "share_kv_heads": share_kv_heads}
    q, k, _ = _inputs(n, n=n)
    ctx = AttentionContext.for_inputs(q, k)
    plan = VERTICAL_SLASH.build(**params).identify(q, k, ctx)
    assert isinstance(plan, StripePlan)
    plan.validate()
    assert plan.plan_heads == (2 if share_kv_heads else 4) and plan.group_rows == block
    expected = _expected_lists(q[0], k[0], params, ctx.scale)
    for head, per_group in enumerate(expected):
        for g, keys in enumerate(per_group):
            listed = _listed(plan, head * plan.num_groups + g)
            row_start, row_end, _, local_start = plan.group_bounds(g)
            if row_end - row_start == block:
                assert listed == keys, (head, g)
            else:
                assert keys <= listed and all(key < local_start for key in listed), (head, g)


def test_batch_rows_are_identified_independently() -> None:
    q, k, _ = _inputs(3, batch=2)
    identifier = VERTICAL_SLASH.build(**SMALL)
    both = identifier.identify(q, k, AttentionContext.for_inputs(q, k))
    for b in range(2):
        alone = identifier.identify(q[b:b + 1], k[b:b + 1], AttentionContext.for_inputs(q[b:b + 1], k[b:b + 1]))
        segments = alone.offsets.numel() - 1
        for s in range(segments):
            assert _listed(both, b * segments + s) == _listed(alone, s)


def test_every_line_kept_gives_dense_attention() -> None:
    q, k, v = _inputs(5, n=130)
    identifier = VERTICAL_SLASH.build(**{**SMALL, "vertical": 10_000, "slash": 10_000})
    out, _ = sparse_attention(q, k, v, identifier)
    expected, _ = dense_attention_reference(q, k, v, q.shape[-1] ** -0.5)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_sparse_output_is_attention_over_the_plan() -> None:
    """bf16 inputs through the dispatcher (Triton stripe executor, interpreted) vs masked dense fp32."""
    q, k, v = _inputs(6, n=144, dtype=torch.bfloat16)
    identifier = VERTICAL_SLASH.build(**SMALL)
    ctx = AttentionContext.for_inputs(q, k)
    plan = identifier.identify(q, k, ctx)
    expected, _ = masked_attention(q, k, v, plan.to_dense(), ctx.scale)
    out, _ = sparse_attention(q, k, v, identifier, ctx)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)


def test_dense_above_and_its_switch_in_the_context() -> None:
    q, k, _ = _inputs(7)
    identifier = VERTICAL_SLASH.build(**{**SMALL, "dense_above": 0.05})
    assert isinstance(identifier.identify(q, k, AttentionContext.for_inputs(q, k)), DensePlan)
    kept = identifier.identify(q, k, AttentionContext.for_inputs(q, k, dense_fallback=False))
    assert isinstance(kept, StripePlan) and kept.density() > 0.05


@pytest.mark.parametrize("share_kv_heads", [False, True])
def test_a_plan_over_the_budget_runs_in_head_chunks_with_the_same_answer(share_kv_heads: bool) -> None:
    q, k, v = _inputs(8, hq=4, hkv=2, n=160)
    identifier = VERTICAL_SLASH.build(**{**SMALL, "share_kv_heads": share_kv_heads})
    whole = identifier.identify(q, k, AttentionContext.for_inputs(q, k))
    with pytest.raises(PlanBudgetExceeded) as exceeded:
        identifier.identify(q, k, AttentionContext.for_inputs(q, k, plan_budget=64))
    assert len(exceeded.value.kv_head_bytes) == 2 and sum(exceeded.value.kv_head_bytes) >= 4 * whole.indices.numel()
    assert (exceeded.value.query_head_bytes is None) == share_kv_heads
    expected, _ = sparse_attention(q, k, v, identifier)
    chunked, _ = sparse_attention(q, k, v, identifier, max_plan_bytes=64)
    torch.testing.assert_close(chunked, expected, atol=1e-6, rtol=1e-5)  # same plans; head tiles may differ


def test_registered_and_configurable_from_a_policy(tmp_path) -> None:
    assert get_pattern("vertical-slash") is VERTICAL_SLASH
    policy = load_policy({"default": {"pattern": "vertical-slash", "vertical": 300, "slash": 500}})
    assert policy.default.as_dict()["vertical"] == 300
    path = tmp_path / "vs.yaml"
    path.write_text("default:\n  pattern: vertical-slash\n  block: 20\n")
    with pytest.raises(PolicyError, match="block.*multiple of 16"):
        load_policy(str(path))


def test_bad_inputs_are_refused() -> None:
    q, k, _ = _inputs(9)
    identifier = VERTICAL_SLASH.build(**SMALL)
    with pytest.raises(ValueError, match="4-D"):
        identifier.identify(q[0], k[0], AttentionContext.for_inputs(q, k))
    with pytest.raises(ValueError, match="multiple of KV heads"):
        identifier.identify(q[:, :3], k, AttentionContext(scale=1.0, num_q_heads=4, num_kv_heads=2, seq_len=160))


@pytest.mark.parametrize("n, vertical, slash", [(160, 0, 0), (160, 0, 5), (160, 5, 0), (12, 12, 9), (9, 0, 0)])
def test_no_lines_and_sequences_shorter_than_the_windows(n: int, vertical: int, slash: int) -> None:
    q, k, v = _inputs(10, n=n)
    identifier = VERTICAL_SLASH.build(**{**SMALL, "vertical": vertical, "slash": slash})
    plan = identifier.identify(q, k, AttentionContext.for_inputs(q, k))
    plan.validate()
    if vertical == slash == 0:
        assert plan.indices.numel() == 0
    out, _ = sparse_attention(q, k, v, identifier)
    assert torch.isfinite(out).all()


EQUAL_CASES = {  # (batch, q heads, kv heads, N, head dim, parameter changes)
    "gqa-ragged": (1, 4, 2, 150, 32, {}),
    "batch2-gqa4-ragged": (2, 4, 1, 77, 16, {"block": 32, "last_q": 40}),
    "batch2-mha": (2, 3, 3, 96, 16, {"sink": 0, "local": 0}),
    "every-line": (1, 4, 2, 130, 16, {"vertical": 10_000, "slash": 10_000}),
    "one-line-each": (2, 4, 2, 150, 16, {"vertical": 1, "slash": 1, "last_q": 1}),
    "no-lines": (1, 2, 1, 100, 16, {"vertical": 0, "slash": 0}),
    "shorter-than-the-windows": (1, 4, 2, 9, 16, {}),
    "scattered-diagonals": (1, 2, 2, 200, 16, {"slash": 60, "local": 3}),
}


@pytest.mark.parametrize("share_kv_heads", [False, True], ids=["per-query-head", "shared"])
@pytest.mark.parametrize("case", EQUAL_CASES)
def test_vectorised_plan_equals_the_per_head_reference(case: str, share_kv_heads: bool) -> None:
    batch, hq, hkv, n, d, changes = EQUAL_CASES[case]
    params = {**SMALL, **changes, "share_kv_heads": share_kv_heads}
    q, k, _ = _inputs(n + hq, batch, hq, hkv, n, d)
    ctx = AttentionContext.for_inputs(q, k)
    selection = {key: value for key, value in params.items() if key != "dense_above"}
    expected = vertical_slash_plan_reference(q, k, ctx.scale, **selection)
    plan = VERTICAL_SLASH.build(**params).identify(q, k, ctx)
    assert isinstance(plan, StripePlan) and plan.plan_heads == (hkv if share_kv_heads else hq)
    plan.validate()
    assert torch.equal(plan.offsets, expected.offsets) and torch.equal(plan.indices, expected.indices)
    # The dense decision is the reference plan's density against dense_above, on either side of it.
    density = expected.density()
    if density > 0:
        below = VERTICAL_SLASH.build(**{**params, "dense_above": density * 0.999}).identify(q, k, ctx)
        assert isinstance(below, DensePlan)
    assert isinstance(VERTICAL_SLASH.build(**{**params, "dense_above": min(1.0, density * 1.001)}).identify(q, k, ctx),
                      StripePlan)


def test_smallest_chunks_and_a_nan_query_row_change_nothing_else(monkeypatch) -> None:
    """One plan head per chunk gives the same plan; a NaN in one head's last queries leaves the other
    heads' lists alone, and the vectorised plan still equals the reference."""
    q, k, _ = _inputs(11, batch=2, n=150)
    ctx = AttentionContext.for_inputs(q, k)
    identifier = VERTICAL_SLASH.build(**SMALL)
    clean = identifier.identify(q, k, ctx)
    monkeypatch.setattr("sparse_prefill.patterns._blocks.CHUNK_ELEMENTS", 1)
    chunked = identifier.identify(q, k, ctx)
    assert torch.equal(chunked.offsets, clean.offsets) and torch.equal(chunked.indices, clean.indices)
    q[1, 2, -3] = float("nan")
    poisoned = identifier.identify(q, k, ctx)
    selection = {key: value for key, value in SMALL.items() if key != "dense_above"}
    expected = vertical_slash_plan_reference(q, k, ctx.scale, share_kv_heads=False, **selection)
    assert torch.equal(poisoned.indices, expected.indices) and torch.equal(poisoned.offsets, expected.offsets)
    segments = clean.num_groups
    for segment in range(2 * 4 * segments):
        if segment // segments != 1 * 4 + 2:  # every segment but those of batch 1, head 2
            assert _listed(poisoned, segment) == _listed(clean, segment)
