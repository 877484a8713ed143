"""The guard's exact attention of sampled rows: the Triton kernel (split over key chunks) against the SDPA
reference and dense attention, in float32 and half precision, with GQA, batches and rows at both ends."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels run on the CPU

from dataclasses import dataclass

import pytest
import torch

from kernel_checks import DEVICE, TOLERANCES, assert_close, needs_kernel, random_qkv
from sparse_prefill.kernels.reference import dense_attention_reference, sampled_rows_reference
from sparse_prefill.kernels.sampled_rows import chunk_keys, sampled_rows_attention


@dataclass(frozen=True)
class Case:
    batch: int
    num_q: int
    num_kv: int
    seq_len: int
    head_dim: int
    rows: int
    chunk_len: int | None
    dtype: torch.dtype = torch.float32


CASES = [
    Case(1, 4, 2, 300, 64, 16, 64),      # many chunks, 16-row tile
    Case(2, 3, 1, 257, 128, 40, 128),    # batch 2, GQA 3, rows not a power of two, a short last chunk
    Case(1, 2, 2, 200, 64, 70, 64),      # more rows than one 64-row tile
    Case(1, 2, 1, 130, 96, 20, None),    # the default chunk (one chunk), padded head dim
    Case(1, 4, 2, 300, 64, 16, 64, torch.bfloat16),
    Case(1, 2, 1, 200, 128, 24, 128, torch.float16),
]


def _rows(case: Case, seed: int) -> torch.Tensor:
    """Sorted distinct rows, always with row 0 and the last row (a row with one key, a row with all)."""
    middle = torch.randperm(case.seq_len - 2, generator=torch.Generator().manual_seed(seed))[: case.rows - 2] + 1
    return torch.cat([torch.tensor([0, case.seq_len - 1]), middle]).sort().values.to(DEVICE or "cpu")


@needs_kernel
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"b{c.batch}h{c.num_q}-{c.num_kv}n{c.seq_len}d{c.head_dim}r{c.rows}c{c.chunk_len}-{str(c.dtype)[6:]}")
def test_kernel_equals_reference_and_dense_rows(case: Case) -> None:
    q, k, v = random_qkv(case, seed=case.seq_len + case.rows, device=DEVICE)
    rows = _rows(case, seed=case.rows)
    scale = case.head_dim**-0.5
    out = sampled_rows_attention(q, k, v, rows, scale, chunk_len=case.chunk_len)
    assert out.dtype == torch.float32 and out.shape == (case.batch, case.num_q, rows.numel(), case.head_dim)
    tolerance = TOLERANCES[case.dtype]
    reference = sampled_rows_reference(q.float(), k.float(), v.float(), rows, scale)
    assert_close(out, reference, tolerance["atol"], tolerance["rtol"], "kernel vs reference")
    dense = dense_attention_reference(q.float(), k.float(), v.float(), scale)[0][:, :, rows]
    assert_close(out, dense, tolerance["atol"], tolerance["rtol"], "kernel vs dense attention")


@needs_kernel
def test_reference_equals_dense_rows_in_float64() -> None:
    case = Case(2, 4, 2, 150, 64, 12, None, torch.float64)
    generator = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, h, 150, 64, generator=generator, dtype=torch.float64) for h in (4, 2, 2))
    rows = _rows(case, seed=5).cpu()
    expected = dense_attention_reference(q, k, v, 0.125)[0][:, :, rows]
    assert torch.allclose(sampled_rows_reference(q, k, v, rows, 0.125), expected, atol=1e-10, rtol=1e-10)


def test_chunks_stay_few_at_any_length() -> None:
    for seq_len in (1, 1000, 32768, 131072, 1 << 20, 3_000_001):
        chunk = chunk_keys(seq_len)
        assert chunk % 64 == 0 and chunk >= 1024
        assert -(-seq_len // chunk) <= 128


@needs_kernel
@pytest.mark.parametrize("bad", [0, 100, -64, True])
def test_bad_chunk_length_is_refused(bad) -> None:
    q, k, v = random_qkv(CASES[0], seed=0, device=DEVICE)
    with pytest.raises(ValueError, match="chunk_len must be a positive multiple of 64"):
        sampled_rows_attention(q, k, v, torch.tensor([5], device=q.device), 0.125, chunk_len=bad)


@needs_kernel
def test_bad_rows_are_refused() -> None:
    q, k, v = random_qkv(CASES[0], seed=0, device=DEVICE)
    with pytest.raises(ValueError, match="rows must be a non-empty 1-D int64 tensor"):
        sampled_rows_attention(q, k, v, torch.tensor([5], dtype=torch.int32, device=q.device), 0.125)


@needs_kernel
def test_a_row_outside_the_sequence_gives_nan_and_leaves_the_others_exact() -> None:
    case = CASES[0]
    q, k, v = random_qkv(case, seed=4, device=DEVICE)
    rows = torch.tensor([3, case.seq_len + 5, 250], device=q.device)
    out = sampled_rows_attention(q, k, v, rows, 0.125, chunk_len=64)
    assert bool(out[:, :, 1].isnan().all())
    expected = sampled_rows_reference(q, k, v, rows[[0, 2]], 0.125)
    assert_close(out[:, :, [0, 2]], expected, **{key: TOLERANCES[torch.float32][key] for key in ("atol", "rtol")},
                 what="rows inside")
