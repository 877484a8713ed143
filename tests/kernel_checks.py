"""What the Triton kernel tests share: where kernels run, tolerances per dtype, and the closeness check."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels run on the CPU

import pytest
import torch

from sparse_prefill.kernels.attention_tiles import INTERPRET

__all__ = ["DEVICE", "needs_kernel", "TOLERANCES", "REFERENCE_TOLERANCE", "assert_close", "random_qkv"]

if INTERPRET:
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:
    DEVICE = None
needs_kernel = pytest.mark.skipif(DEVICE is None, reason="needs a CUDA device or TRITON_INTERPRET=1")

# Output: the kernels round probabilities to the input dtype before P @ V (fp16 ~1e-3, bf16 ~8e-3
# relative), the references keep them in fp32. LSE is accumulated in fp32 by both.
TOLERANCES = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-4, "lse_atol": 1e-5},
    torch.float16: {"atol": 2e-3, "rtol": 1e-2, "lse_atol": 1e-4},
    torch.bfloat16: {"atol": 1.6e-2, "rtol": 2e-2, "lse_atol": 1e-4},
}
REFERENCE_TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}  # fp32 reference vs fp32 dense softmax


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, what: str) -> None:
    """Finite and close; the failure message gives the max absolute and relative error."""
    actual, expected = actual.float().cpu(), expected.float().cpu()
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    error = (actual - expected).abs()
    relative = (error / expected.abs().clamp_min(1e-6)).max()
    assert torch.allclose(actual, expected, atol=atol, rtol=rtol), (
        f"{what}: max abs error {error.max():.3g}, max rel error {relative:.3g} (atol {atol}, rtol {rtol})"
    )


def random_qkv(case, seed: int, device: str | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fresh normal q [B, Hq, N, D], k and v [B, Hkv, N, D] in ``case.dtype`` for any case with batch,
    num_q, num_kv, seq_len, head_dim and dtype; drawn on the CPU, so a seed gives the same values anywhere."""
    generator = torch.Generator().manual_seed(seed)
    shapes = [(case.batch, heads, case.seq_len, case.head_dim) for heads in (case.num_q, case.num_kv, case.num_kv)]
    return tuple(torch.randn(shape, generator=generator).to(device=device, dtype=case.dtype) for shape in shapes)
