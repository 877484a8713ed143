"""`block-topk`'s Triton selection (interpreted on the CPU) against its PyTorch version: random scores of many
shapes and ``keep`` values, rows with fewer candidates than places, non-finite scores, ties, and the
identifier's plan through the kernel equal to the reference's."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels run on the CPU

import pytest
import torch

from kernel_checks import DEVICE, needs_kernel
from sparse_prefill.interfaces import AttentionContext
from sparse_prefill.patterns import block_topk, top_blocks
from sparse_prefill.patterns.block_topk import BLOCK_TOPK, _top_block_lists_torch, block_topk_masks
from sparse_prefill.patterns.top_blocks import top_block_lists, top_block_problems
from sparse_prefill.plan import BlockPlan


def _scores(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=generator) * 3).to(DEVICE or "cpu")


@needs_kernel
@pytest.mark.parametrize("num_blocks", [1, 2, 7, 33, 100])
@pytest.mark.parametrize("keep", [0, 1, 3, 16, 99, 200])
def test_the_kernel_lists_what_topk_and_a_sort_list(num_blocks: int, keep: int) -> None:
    scores = _scores((2, 3, num_blocks, num_blocks), seed=num_blocks * 1000 + keep)
    lists = top_block_lists(scores, keep)
    expected = _top_block_lists_torch(scores, min(keep, num_blocks))
    assert lists.shape == expected.shape == (2, 3, num_blocks, min(keep, num_blocks) + 1)
    assert torch.equal(lists.cpu(), expected.cpu())


@needs_kernel
@pytest.mark.parametrize("num_blocks", [5, 40])
def test_one_row_per_program_as_on_a_gpu_lists_the_same(num_blocks: int, monkeypatch) -> None:
    scores = _scores((1, 2, num_blocks, num_blocks), seed=num_blocks)
    monkeypatch.setattr(top_blocks, "_interpreted_rows", lambda blocks: 1)
    assert torch.equal(top_block_lists(scores, 6).cpu(), _top_block_lists_torch(scores, 6).cpu())


@needs_kernel
@pytest.mark.parametrize("scale", [0.088, 1e-30, -0.5])
def test_the_scale_is_applied_as_pytorch_applies_it(scale: float) -> None:
    scores = _scores((1, 2, 50, 50), seed=11)
    near = 1 + torch.arange(30.0, device=scores.device) * 3e-7  # a few ulps apart
    scores[0, 0, 40, :30] = scores[0, 0, 40, 3] * near
    assert torch.equal(top_block_lists(scores, 7, scale).cpu(), _top_block_lists_torch(scores * scale, 7).cpu())


@needs_kernel
def test_non_finite_scores_never_win_and_short_rows_keep_every_candidate() -> None:
    scores = _scores((1, 2, 40, 40), seed=3)
    scores[0, 0, 30, :20] = float("nan")
    scores[0, 0, 31, 5] = float("inf")
    scores[0, 1, 35, :] = float("-inf")
    scores[0, 1, 36, 10:20] = 1e30 + torch.arange(10.0) * 1e28  # large but finite: kept
    lists = top_block_lists(scores, 8)
    assert torch.equal(lists.cpu(), _top_block_lists_torch(scores, 8).cpu())
    assert lists[0, 0, 30].tolist()[:8] == sorted((20 + scores[0, 0, 30, 20:30].topk(8).indices).cpu().tolist())
    assert 5 not in lists[0, 0, 31].tolist()
    assert lists[0, 1, 35].tolist() == [35] + [40] * 8  # only its diagonal
    assert lists[0, 1, 36].tolist()[:8] == list(range(12, 20))
    assert lists[0, 0, 4].tolist() == [0, 1, 2, 3, 4, 40, 40, 40, 40]  # four candidates for eight places


@needs_kernel
def test_ties_at_the_threshold_go_to_the_earlier_blocks() -> None:
    scores = torch.zeros(1, 1, 12, 12, device=DEVICE or "cpu")
    scores[0, 0, 11, 7] = 2.0
    lists = top_block_lists(scores, 4)
    assert lists[0, 0, 11].tolist() == [0, 1, 2, 7, 11]
    assert lists[0, 0, 3].tolist() == [0, 1, 2, 3, 12]


@needs_kernel
@pytest.mark.parametrize("seq_len, block, blocks", [(300, 16, 5), (77, 32, 2), (1024, 64, 3)])
def test_the_identifier_through_the_kernel_gives_the_reference_plan(seq_len: int, block: int, blocks: int,
                                                                    monkeypatch) -> None:
    monkeypatch.setattr(block_topk, "top_block_problems", lambda x: [])  # the kernel on the CPU too
    generator = torch.Generator().manual_seed(seq_len)
    q = torch.randn(2, 4, seq_len, 32, generator=generator).to(DEVICE or "cpu")
    k = torch.randn(2, 2, seq_len, 32, generator=generator).to(DEVICE or "cpu")
    ctx = AttentionContext.for_inputs(q, k)
    plan = BLOCK_TOPK.build(blocks=blocks, block=block, dense_above=1.0).identify(q, k, ctx)
    assert isinstance(plan, BlockPlan)
    plan.validate()
    expected = block_topk_masks(q, k, ctx.scale, blocks, block).cpu()
    mask = torch.zeros_like(expected).view(-1, expected.shape[-1])
    for segment in range(mask.shape[0]):
        mask[segment, plan.indices[plan.offsets[segment]:plan.offsets[segment + 1]].long().cpu()] = True
    assert torch.equal(mask.view_as(expected), expected)


def test_problems_and_argument_errors() -> None:
    assert top_block_problems(torch.zeros(2, 2)) == ["device cpu (the kernel runs on CUDA)"]
    with pytest.raises(ValueError, match="float32"):
        top_block_lists(torch.zeros(1, 3, 3, dtype=torch.float16), 1)
    with pytest.raises(ValueError, match="square"):
        top_block_lists(torch.zeros(1, 3, 4), 1)
    with pytest.raises(ValueError, match="keep must be >= 0"):
        top_block_lists(torch.zeros(1, 3, 3), -1)
