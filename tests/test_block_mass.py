"""The Triton block scores of xattention and flashprefill against their PyTorch versions (interpreted on the CPU):
float32 and half precision, GQA, batches, lengths that are not a multiple of the block, non-finite inputs."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels run on the CPU

from dataclasses import dataclass

import pytest
import torch

from kernel_checks import DEVICE, needs_kernel
from sparse_prefill.patterns import _blocks, block_mass
from sparse_prefill.patterns.block_mass import antidiagonal_block_mass, block_mass_problems, pooled_block_scores
from sparse_prefill.patterns.flashprefill import flashprefill_block_scores
from sparse_prefill.patterns.xattention import xattention_block_mass


@dataclass(frozen=True)
class Case:
    batch: int
    num_q: int
    num_kv: int
    seq_len: int
    head_dim: int
    block: int
    stride: int
    dtype: torch.dtype = torch.float32


CASES = [
    Case(1, 4, 2, 300, 32, 64, 4),     # 16 tile rows per query block, a partial last block
    Case(2, 3, 1, 257, 64, 32, 2),     # batch 2, GQA 3, one key in the last block
    Case(1, 2, 2, 512, 16, 64, 16),    # 4 tile rows per query block (16 blocks per program)
    Case(1, 2, 1, 200, 48, 16, 1),     # stride 1, padded head dim
    Case(1, 4, 2, 300, 32, 64, 8, torch.bfloat16),
    Case(1, 2, 1, 260, 64, 32, 4, torch.float16),
]
# Half precision: the kernel multiplies in the inputs' dtype (exact products, float32 sums) like the PyTorch
# version, which converts to float32 first; flashprefill's pooled keys are rounded to the dtype as well.
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def _ids(case: Case) -> str:
    return (f"b{case.batch}h{case.num_q}-{case.num_kv}n{case.seq_len}d{case.head_dim}B{case.block}s{case.stride}"
            f"-{str(case.dtype)[6:]}")


def _inputs(case: Case, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(case.batch, case.num_q, case.seq_len, case.head_dim, generator=generator) * 2
    k = torch.randn(case.batch, case.num_kv, case.seq_len, case.head_dim, generator=generator)
    return q.to(DEVICE or "cpu", case.dtype), k.to(DEVICE or "cpu", case.dtype)


def _close(actual: torch.Tensor, expected: torch.Tensor, atol: float, what: str) -> None:
    assert torch.isfinite(actual).all(), f"{what}: non-finite"
    error = (actual.cpu() - expected.cpu()).abs().max()
    assert error <= atol, f"{what}: max abs error {error:.3g} (atol {atol})"


@needs_kernel
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_antidiagonal_mass_equals_xattentions(case: Case) -> None:
    q, k = _inputs(case, seed=case.seq_len)
    scale = case.head_dim ** -0.5
    mass = antidiagonal_block_mass(q, k, scale, case.block, case.stride)
    expected = xattention_block_mass(q, k, scale, case.block, case.stride)
    _close(mass, expected, TOLERANCE[case.dtype], "antidiagonal block mass")
    rows = mass.sum(dim=-1)  # every query block's tile rows each sum to 1
    tiles_per_block = case.block // case.stride
    real = torch.full_like(rows, tiles_per_block)
    real[..., -1] = -(-(case.seq_len - (rows.shape[-1] - 1) * case.block) // case.stride)
    assert torch.allclose(rows, real, atol=1e-3 if case.dtype == torch.float32 else 3e-2)


@needs_kernel
@pytest.mark.parametrize("case", [c for c in CASES if c.block & (c.block - 1) == 0], ids=_ids)
def test_pooled_scores_equal_flashprefills(case: Case) -> None:
    q, k = _inputs(case, seed=case.seq_len + 1)
    scale = case.head_dim ** -0.5
    pooled = _blocks.block_means(k, case.block)
    scores = pooled_block_scores(q, pooled.to(q.dtype), scale, case.block)
    expected = flashprefill_block_scores(q, k, scale, case.block)
    _close(scores, expected, TOLERANCE[case.dtype], "pooled block scores")
    totals = scores.sum(dim=-1)  # one softmax per query block: its scores sum to 1 once it scores anything
    assert torch.allclose(totals, torch.ones_like(totals), atol=1e-3 if case.dtype == torch.float32 else 3e-2)


@needs_kernel
def test_pooled_scores_rescale_across_column_tiles() -> None:
    # 150 pooled blocks: three column tiles of 64, keys growing along the sequence so that the running maximum
    # rises from tile to tile and the earlier tiles' masses must be rescaled to the final one.
    generator = torch.Generator().manual_seed(11)
    seq_len, block = 150 * 16 - 5, 16
    q = torch.randn(1, 2, seq_len, 32, generator=generator)
    growth = torch.linspace(0.2, 4.0, seq_len)[:, None]
    k = torch.randn(1, 1, seq_len, 32, generator=generator) * growth + growth * 0.5
    q, k = q.to(DEVICE or "cpu"), k.to(DEVICE or "cpu")
    scores = pooled_block_scores(q, _blocks.block_means(k, block), 0.2, block)
    expected = flashprefill_block_scores(q, k, 0.2, block)
    _close(scores, expected, 2e-5, "pooled block scores over three column tiles")
    assert (scores[..., 70:, 64:].amax(dim=-1) > scores[..., 70:, :64].amax(dim=-1)).float().mean() > 0.5


@needs_kernel
def test_antidiagonal_mass_rescales_to_each_rows_final_maximum() -> None:
    # 300 tile rows at stride 2: three steps of 128 key tiles, keys growing along the sequence so that each row's
    # maximum rises from step to step and the block sums stored against an earlier maximum must be read back
    # against the final one.
    generator = torch.Generator().manual_seed(12)
    seq_len, block, stride = 600, 32, 2
    q = torch.randn(1, 2, seq_len, 32, generator=generator)
    growth = torch.linspace(0.2, 3.0, seq_len)[:, None]
    k = torch.randn(1, 1, seq_len, 32, generator=generator) * growth + growth * 0.5
    q, k = q.to(DEVICE or "cpu"), k.to(DEVICE or "cpu")
    mass = antidiagonal_block_mass(q, k, 0.2, block, stride)
    _close(mass, xattention_block_mass(q, k, 0.2, block, stride), 2e-5, "antidiagonal mass over three steps")
    assert (mass[..., 10:, 8:].amax(dim=-1) > mass[..., 10:, :8].amax(dim=-1)).float().mean() > 0.5


@needs_kernel
@pytest.mark.parametrize("tiles_per_launch", [1, 3, None], ids=["tile", "tiles", "heads"])
def test_antidiagonal_mass_is_the_same_in_launches_of_any_size(monkeypatch: pytest.MonkeyPatch,
                                                               tiles_per_launch: int | None) -> None:
    # The scratch holds one float32 per tile row and key block; a small one splits the launch over tiles (a tile
    # or three at a time) or over heads (all tiles of one head at a time).
    case = Case(2, 3, 1, 700, 32, 32, 2)  # 350 tile rows: 6 programs of 64 per head, 6 heads
    q, k = _inputs(case, seed=13)
    scale = case.head_dim ** -0.5
    whole = antidiagonal_block_mass(q, k, scale, case.block, case.stride)
    per_tile = 64 * 22 * 4  # rows per program x key blocks x 4 bytes
    monkeypatch.setattr(block_mass, "_SCRATCH_BYTES", per_tile * (tiles_per_launch or 6))
    split = antidiagonal_block_mass(q, k, scale, case.block, case.stride)
    assert torch.equal(split, whole)
    _close(split, xattention_block_mass(q, k, scale, case.block, case.stride), 2e-5, "split launches")


@needs_kernel
@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")  # the interpreter's NaN
def test_non_finite_rows_and_keys_count_as_no_mass_as_in_pytorch() -> None:
    case = CASES[0]
    q, k = _inputs(case, seed=7)
    q[0, 1, 150] = float("nan")
    k[0, 0, 70] = float("inf")
    scale = case.head_dim ** -0.5
    _close(antidiagonal_block_mass(q, k, scale, case.block, case.stride),
           xattention_block_mass(q, k, scale, case.block, case.stride), 2e-5, "antidiagonal, non-finite inputs")
    pooled = _blocks.block_means(k, case.block)
    _close(pooled_block_scores(q, pooled, scale, case.block), flashprefill_block_scores(q, k, scale, case.block),
           2e-5, "pooled, non-finite inputs")


def test_problems_name_what_the_kernel_cannot_take() -> None:
    q = torch.zeros(1, 2, 8, 512)
    problems = block_mass_problems(q.to(torch.float64), 96, 8)
    assert any("device cpu" in p for p in problems) and any("float64" in p for p in problems)
    assert any("head dim 512" in p for p in problems) and any("block // stride = 12" in p for p in problems)
    assert any("128 > 64" in p for p in block_mass_problems(q, 128, 1))  # the tile sizes measured on an H200
    assert not any(">" in p for p in block_mass_problems(q[..., :64], 128, 1, pooled=True))
    assert any("256 > 128" in p for p in block_mass_problems(q, 256, pooled=True))
    with pytest.raises(ValueError, match="block // stride = 12"):
        antidiagonal_block_mass(torch.zeros(1, 2, 192, 16), torch.zeros(1, 2, 192, 16), 0.25, 96, 8)
