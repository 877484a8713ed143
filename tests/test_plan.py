import pytest
import torch

from plan_factories import random_block_plan, random_stripe_plan
from sparse_prefill.plan import BlockPlan, DensePlan, StripePlan


def stripe_plan(seq_len=10, group_rows=4, sink=2, local=2, selected=None, batch=1, heads=1):
    groups = -(-seq_len // group_rows)
    selected = selected or {}
    lists = [selected.get((b, h, g), []) for b in range(batch) for h in range(heads) for g in range(groups)]
    counts = torch.tensor([len(x) for x in lists], dtype=torch.int64)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    indices = torch.tensor([i for x in lists for i in x], dtype=torch.int32)
    return StripePlan(batch, heads, seq_len, group_rows, sink, local, offsets, indices)


def test_stripe_geometry_partitions_causal_range():
    # group 2 holds rows 8..9; local window starts at 6, sink ends at 2; candidates are 2..5.
    plan = stripe_plan(selected={(0, 0, 2): [3, 5]})
    plan.validate()
    mask = plan.to_dense()[0, 0]
    assert mask[8].tolist() == [True, True, False, True, False, True, True, True, True, False]
    assert not (mask & ~torch.ones(10, 10, dtype=torch.bool).tril()).any(), "mask must be causal"


def test_stripe_density_matches_dense_mask():
    plan = stripe_plan(seq_len=13, group_rows=4, sink=1, local=3, selected={(0, 0, 2): [1, 3], (0, 0, 3): [2]})
    plan.validate()
    expected = plan.to_dense().sum().item() / (13 * 14 / 2)
    assert plan.density() == pytest.approx(expected)


@pytest.mark.parametrize("seq_len, group_rows, sink, local",
                         [(37, 8, 3, 5), (64, 16, 0, 0), (50, 7, 20, 40), (5, 8, 2, 2)])
def test_stripe_density_of_counts_matches_dense_mask_on_random_plans(seq_len, group_rows, sink, local):
    """The two-sum density an identifier decides on after its sync, against the mask, batch and heads > 1."""
    plan = random_stripe_plan(2, 3, seq_len, group_rows, sink, local, fraction=0.4, seed=seq_len)
    per_group = plan.counts().sum(dim=(0, 1))
    expected = plan.to_dense().sum().item() / (2 * 3 * seq_len * (seq_len + 1) / 2)
    assert plan.density_of_counts(int(per_group.sum()), int(per_group[-1])) == pytest.approx(expected)
    assert plan.density_with(per_group) == pytest.approx(expected)


@pytest.mark.parametrize(
    "selected, message",
    [
        ({(0, 0, 2): [1]}, "between each group's windows"),  # inside the sink
        ({(0, 0, 2): [6]}, "between each group's windows"),  # inside the local window
        ({(0, 0, 2): [4, 3]}, "sorted ascending"),
        ({(0, 0, 2): [3, 3]}, "sorted ascending"),
    ],
    ids=["in-sink", "in-local", "unsorted", "duplicate"],
)
def test_stripe_validate_rejects_bad_indices(selected, message):
    with pytest.raises(ValueError, match=message):
        stripe_plan(selected=selected).validate()


def test_stripe_validate_rejects_bad_csr_dtypes_and_shapes():
    plan = stripe_plan()
    with pytest.raises(TypeError, match="int64"):
        StripePlan(1, 1, 10, 4, 2, 2, plan.offsets.int(), plan.indices).validate()
    with pytest.raises(ValueError, match=r"shape \[4\]"):
        StripePlan(1, 1, 10, 4, 2, 2, plan.offsets[:-1], plan.indices).validate()
    with pytest.raises(ValueError, match="group_rows must be positive"):
        StripePlan(1, 1, 10, 0, 2, 2, plan.offsets, plan.indices).validate()


def test_block_plan_to_dense_and_validate():
    offsets = torch.tensor([0, 1, 3], dtype=torch.int64)  # block 0 -> [0]; block 1 -> [0, 1]
    plan = BlockPlan(1, 1, 6, 4, offsets, torch.tensor([0, 0, 1], dtype=torch.int32))
    plan.validate()
    assert torch.equal(plan.to_dense()[0, 0], torch.ones(6, 6, dtype=torch.bool).tril())
    assert plan.density() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="causal"):
        BlockPlan(1, 1, 6, 4, offsets, torch.tensor([1, 0, 1], dtype=torch.int32)).validate()


def test_dense_plan():
    plan = DensePlan(2, 3, 5)
    plan.validate()
    assert plan.to_dense().shape == (2, 3, 5, 5)
    assert plan.density() == 1.0
    with pytest.raises(ValueError, match="seq_len"):
        DensePlan(1, 1, 0).validate()


def test_repr_shows_shape_and_density():
    text = repr(stripe_plan(selected={(0, 0, 2): [3]}))
    assert "StripePlan(" in text and "density=" in text and "selected=1" in text


def test_block_density_matches_dense_mask_on_random_plans():
    for seq_len, block in ((37, 8), (64, 16), (5, 4)):
        plan = random_block_plan(2, 3, seq_len, block, fraction=0.5, seed=seq_len)
        expected = plan.to_dense().sum().item() / (2 * 3 * seq_len * (seq_len + 1) / 2)
        assert plan.density() == pytest.approx(expected)
