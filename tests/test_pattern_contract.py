"""The contract every registered pattern keeps, built-in or plugin, checked over the registry itself: a new
pattern is tested the day it registers. Each pattern's own file tests what only it does."""

import pytest
import torch

from sparse_prefill import available_patterns, get_pattern, load_policy, sparse_attention
from sparse_prefill.plugin import AttentionContext, DensePlan, Identifier
from tests.plan_factories import masked_attention

PATTERNS = sorted(info.name for info in available_patterns())


def _inputs(seed: int, n: int = 320) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, n, 32, generator=generator)
    k, v = (torch.randn(2, 2, n, 32, generator=generator) for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("name", PATTERNS)
def test_defaults_build_and_unknown_parameters_are_refused(name: str) -> None:
    spec = get_pattern(name)
    assert isinstance(spec.build(), Identifier)
    with pytest.raises(ValueError, match=name):
        spec.build(no_such_parameter=1)
    assert load_policy({"min_length": 0, "default": {"pattern": name}}).default.pattern == name


@pytest.mark.parametrize("name", PATTERNS)
def test_plan_fits_the_inputs_and_the_output_is_attention_over_it(name: str) -> None:
    q, k, v = _inputs(PATTERNS.index(name))
    identifier = get_pattern(name).build()
    ctx = AttentionContext.for_inputs(q, k, dense_fallback=False)
    plan = identifier.identify(q, k, ctx)
    assert (plan.batch, plan.seq_len) == (2, 320)
    assert 0.0 < plan.density() <= 1.0
    if hasattr(plan, "validate"):
        plan.validate()
    out, _ = sparse_attention(q, k, v, identifier, ctx)
    assert out.shape == q.shape and torch.isfinite(out).all()
    mask = torch.ones(320, 320, dtype=torch.bool).tril().expand(2, 1, -1, -1) if isinstance(plan, DensePlan) \
        else plan.to_dense()
    expected, _ = masked_attention(q, k, v, mask, ctx.scale)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("n", [256, 320])  # a whole number of 128-row blocks (no padding copies the input), and not
@pytest.mark.parametrize("name", PATTERNS)
def test_the_layout_of_a_hugging_face_call_selects_what_contiguous_inputs_do(name: str, n: int) -> None:
    """Hugging Face passes q and k as [B, N, H, D] buffers viewed as [B, H, N, D]: the same values in another
    memory layout must give the same plan and output."""
    q, k, v = _inputs(PATTERNS.index(name) + 7, n)
    strided = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v)]
    assert not strided[0].is_contiguous()
    identifier = get_pattern(name).build()
    ctx = AttentionContext.for_inputs(q, k, dense_fallback=False)
    plan, strided_plan = identifier.identify(q, k, ctx), identifier.identify(*strided[:2], ctx)
    expected_mask = plan.to_dense() if not isinstance(plan, DensePlan) else None
    assert type(strided_plan) is type(plan)
    if expected_mask is not None:
        assert torch.equal(strided_plan.to_dense(), expected_mask)
    torch.testing.assert_close(sparse_attention(*strided, identifier, ctx)[0], sparse_attention(q, k, v, identifier, ctx)[0])
