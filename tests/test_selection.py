"""The selection picture's numbers, checked against the O(N^2) definitions on tiny inputs."""

from __future__ import annotations

import math

import pytest
import torch

from sparse_prefill.evaluation.selection import plan_rows_mask, selection_grid
from sparse_prefill.patterns.anchor.reference import anchor_identify_reference
from sparse_prefill.plan import BlockPlan, DensePlan


def _inputs(n: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, n, 32, generator=gen), torch.randn(2, 2, n, 32, generator=gen)


def _random_block_plan(n: int, size: int, seed: int) -> BlockPlan:
    gen = torch.Generator().manual_seed(seed)
    blocks = math.ceil(n / size)
    keep = [torch.nonzero((torch.rand(i + 1, generator=gen) < 0.5) | (torch.arange(i + 1) == i)).flatten()
            for _ in range(2 * 2) for i in range(blocks)]
    offsets = torch.tensor([0] + [len(x) for x in keep]).cumsum(0)
    return BlockPlan(batch=2, heads=2, seq_len=n, block_size=size, offsets=offsets, indices=torch.cat(keep).int())


def _plans(n: int, seed: int):
    q, k = _inputs(n, seed)
    yield "stripe-shared", anchor_identify_reference(q, k, scale=32**-0.5, theta=2.0, block=16, group_blocks=2,
                                                     sink=8, local=16, share_kv_heads=True)
    yield "stripe-perhead", anchor_identify_reference(q, k, scale=32**-0.5, theta=2.0, block=16, group_blocks=2,
                                                      sink=8, local=16, share_kv_heads=False)
    yield "block", _random_block_plan(n, 32, seed)
    yield "dense", DensePlan(batch=2, heads=4, seq_len=n)


@pytest.mark.parametrize("n, cell", [(150, 16), (97, 32)])
def test_grid_matches_the_dense_definitions(n, cell):
    q, k = _inputs(n, 0)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    for name, plan in _plans(n, 0):
        heads = plan.plan_heads if hasattr(plan, "plan_heads") else plan.heads
        for batch, head in ((0, 3), (1, 0)):
            dense_mask = plan.to_dense()[batch, head // (4 // heads)]
            assert torch.equal(plan_rows_mask(plan, batch, head // (4 // heads), 5, n - 3), dense_mask[5:n - 3]), name
            scores = (32**-0.5) * q[batch, head].double() @ k[batch, head // 2].double().T
            probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
            grid = selection_grid(q, k, plan, head=head, scale=32**-0.5, cell=cell, batch=batch)
            assert grid.recall == pytest.approx(float((probs * dense_mask).sum() / n), abs=1e-5), name
            assert grid.density == pytest.approx(int(dense_mask.sum()) / int(causal.sum()), abs=1e-12), name
            tiles = math.ceil(n / cell)
            for i in range(tiles):
                rows = slice(i * cell, min((i + 1) * cell, n))
                assert grid.mass[i].sum() == pytest.approx(1.0, abs=1e-5)
                for j in range(tiles):
                    keys = slice(j * cell, min((j + 1) * cell, n))
                    assert grid.mass[i, j] == pytest.approx(float(probs[rows, keys].sum(-1).mean()), abs=1e-5)
                    pairs = causal[rows, keys]
                    if j > i:
                        assert math.isnan(grid.selected[i, j])
                    else:
                        want = float((dense_mask[rows, keys] & pairs).sum() / pairs.sum())
                        assert grid.selected[i, j] == pytest.approx(want, abs=1e-6), name
    assert not torch.isnan(grid.mass).any()


def test_bad_arguments_are_refused():
    q, k = _inputs(64, 1)
    plan = DensePlan(batch=2, heads=4, seq_len=64)
    with pytest.raises(ValueError, match="head"):
        selection_grid(q, k, plan, head=4)
    with pytest.raises(ValueError, match="cell"):
        selection_grid(q, k, plan, head=0, cell=0)
    with pytest.raises(ValueError, match="seq_len"):
        selection_grid(q, k, DensePlan(batch=2, heads=4, seq_len=32), head=0)
    with pytest.raises(TypeError, match="StripePlan"):
        plan_rows_mask(object(), 0, 0, 0, 8)


def test_the_picture_is_drawn(tmp_path):
    pytest.importorskip("matplotlib")
    from sparse_prefill.evaluation.plots import plot_selection

    q, k = _inputs(150, 2)
    grids = {name: selection_grid(q, k, plan, head=1, cell=16) for name, plan in _plans(150, 2)}
    path = plot_selection(grids, tmp_path / "selection.png", title="tiny")
    assert path.stat().st_size > 1000
