"""benchmarks/speed.py's CPU-side helpers: what its records report must be what they say."""

from __future__ import annotations

import pytest
import torch

from benchmark_scripts import load_benchmark

speed = load_benchmark("speed")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", [1, 3])
def test_relative_error_one_head_at_a_time_is_the_whole_tensor_formula(dtype, heads):
    torch.manual_seed(heads)
    out, ref = (torch.randn(2, heads, 37, 16).to(dtype) for _ in range(2))
    whole = float((out.float() - ref.float()).norm() / ref.float().norm())
    assert speed.relative_error(out, ref) == pytest.approx(whole, rel=1e-5)
    assert speed.relative_error(ref, ref) == 0.0
