"""float8 rounding of q and k (xattention's ``float8_scores``): the Triton kernels against their PyTorch version
(interpreted on the CPU), the properties the scores rely on, and the block mass and masks computed from it."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels run on the CPU

import pytest
import torch

from kernel_checks import DEVICE, needs_kernel
from sparse_prefill.kernels import float8 as float8_module
from sparse_prefill.kernels.float8 import FLOAT8_MAX, float8_rounded, float8_rounded_reference
from sparse_prefill.patterns.block_mass import antidiagonal_block_mass
from sparse_prefill.patterns.xattention import (
    XATTENTION,
    xattention_block_mask_reference,
    xattention_block_mass,
    xattention_block_masks,
)
from sparse_prefill.interfaces import AttentionContext

# The interpreter's float32 -> float8 cast of a NaN or of a value between two e4m3 numbers is wrong; the kernel
# rounds and writes NaN's bits itself, and these warnings come from the lanes it then discards.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",
                                        "ignore:invalid value encountered:RuntimeWarning")


def _values(shape: tuple[int, ...], seed: int, dtype: torch.dtype) -> torch.Tensor:
    """Heads of very different magnitudes (1e-3 to 300), one head all zeros, one infinity and one NaN."""
    generator = torch.Generator().manual_seed(seed)
    magnitudes = torch.logspace(-3, 2.5, shape[1])[None, :, None, None]
    x = torch.randn(*shape, generator=generator) * magnitudes
    x[0, -1] = 0.0
    x[-1, 0, 3, 1] = float("inf")
    x[0, 1, 2, 0] = float("nan")
    return x.to(dtype)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.float(), b.float()
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(2, 4, 70, 48), (1, 3, 130, 64), (1, 2, 5, 16)], ids=str)
def test_the_kernel_rounds_as_pytorch_does(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    x = _values(shape, seed=sum(shape), dtype=dtype)
    rounded, unit = float8_rounded(x.to(DEVICE))
    expected, expected_unit = float8_rounded_reference(x)
    assert rounded.dtype == torch.float8_e4m3fn and rounded.shape == x.shape
    assert _same(rounded.cpu(), expected) and torch.equal(unit.cpu(), expected_unit)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rounding_keeps_three_mantissa_bits_per_head_and_non_finite_values_non_finite(dtype: torch.dtype) -> None:
    x = _values((2, 5, 64, 32), seed=3, dtype=dtype).float()
    rounded, unit = float8_rounded_reference(x)
    back = rounded.float() * unit[..., None, None]
    finite = torch.isfinite(x)
    assert torch.equal(torch.isnan(back), ~finite)  # infinity and NaN both become NaN: no score either way
    assert torch.equal(torch.exp2(torch.log2(unit)), unit)  # a power of two: x8 * unit is exact in any dtype
    top = torch.where(finite, x.abs(), 0).amax(dim=(2, 3))
    largest = torch.where(finite, rounded.float().abs(), 0).amax(dim=(2, 3))
    used = top > 0
    # Each head's largest value lands in e4m3's top binade: no overflow, at most one bit of range left unused.
    assert bool((largest[used] <= FLOAT8_MAX).all() and (largest[used] >= FLOAT8_MAX / 2 - 16).all())
    assert bool((rounded.float()[~used] == 0).all())
    # Round to nearest: relative error at most 2^-4 where the value is a normal e4m3 number.
    normal = finite & (x.abs() >= 2.0 ** -6 * unit[..., None, None])
    assert bool(((back - x).abs()[normal] <= 2.0 ** -4 * x.abs()[normal]).all())


def test_the_scale_exponent_never_lets_the_largest_value_pass_448(monkeypatch: pytest.MonkeyPatch) -> None:
    """log2 may round either way at a power of two; the exponent is corrected, not trusted."""
    tops = torch.tensor([FLOAT8_MAX, FLOAT8_MAX / 3, 1e-30, 3e30, 7.0, 7.0000005, 0.0])
    exponent = float8_module._unit_exponent(tops)
    scaled = tops * torch.exp2(exponent)
    assert bool((scaled <= FLOAT8_MAX).all()) and bool((scaled[tops > 0] > FLOAT8_MAX / 2).all())


# sm_90's float8 tensor cores sum products in an accumulator of about 13 mantissa bits (unless promoted to float32
# every ``_FLOAT8_PROMOTE`` terms); a generous bound: each logit moves by at most 2^-10 of the sum of its terms'
# absolute values. The interpreter multiplies in float32.
_FLOAT8_ACCUMULATION_ERROR = 2.0 ** -10 if DEVICE == "cuda" else 0.0


def _float8_mass_bound(expected: torch.Tensor, q8: torch.Tensor, k8: torch.Tensor, scale: float, stride: int
                       ) -> torch.Tensor:
    """How far the kernel's mass may be from ``expected`` (the float32 mass of the rounded q8, k8): every logit
    within delta of its float32 value moves each row's softmax ratios by at most a factor exp(2 delta), so each
    block mass (a sum of such ratios) too. delta per head from Cauchy-Schwarz: the absolute terms of one
    antidiagonal sum to at most stride * max |q row| * max |k row|."""
    group = q8.shape[1] // k8.shape[1]
    top_q = q8.norm(dim=-1).amax(dim=-1)
    top_k = k8.norm(dim=-1).amax(dim=-1).repeat_interleave(group, dim=1)
    delta = _FLOAT8_ACCUMULATION_ERROR * scale * top_q * top_k  # scale / stride times stride terms
    return expected * torch.expm1(2 * delta)[..., None, None] + 2e-5


@needs_kernel
@pytest.mark.parametrize("promote", [None, 32], ids=["accumulator", "promoted-every-32"])
@pytest.mark.parametrize("tensor_cores", [True, False], ids=["float8-dot", "bf16-of-rounded"])
def test_float8_block_mass_is_the_mass_of_the_rounded_inputs(monkeypatch: pytest.MonkeyPatch,
                                                            tensor_cores: bool, promote: int | None) -> None:
    """With or without float8 tensor cores (without: the rounded values in bf16, exact), the kernel's mass is
    the PyTorch mass of q and k rounded per head, within what float8 accumulation may add."""
    import sparse_prefill.patterns.block_mass as block_mass

    monkeypatch.setattr(block_mass, "float8_dot_supported", lambda device: tensor_cores)
    monkeypatch.setattr(block_mass, "_FLOAT8_PROMOTE", promote)
    generator = torch.Generator().manual_seed(5)
    q = torch.randn(1, 4, 300, 32, generator=generator) * 3
    k = torch.randn(1, 2, 300, 32, generator=generator) * torch.tensor([1.0, 4.0])[None, :, None, None]
    rounded = [float8_rounded_reference(x) for x in (q, k)]
    q8, k8 = (x8.float() * unit[..., None, None] for x8, unit in rounded)
    scale = 32 ** -0.5
    mass = antidiagonal_block_mass(q.to(DEVICE), k.to(DEVICE), scale, 64, 4, float8=True).cpu()
    expected = xattention_block_mass(q8, k8, scale, 64, 4)
    assert torch.isfinite(mass).all()
    bound = _float8_mass_bound(expected, q8, k8, scale, 4) if tensor_cores else 2e-5
    assert ((mass - expected).abs() <= bound).all(), float((mass - expected).abs().max())
    assert (mass - xattention_block_mass(q, k, scale, 64, 4)).abs().max() > 1e-4  # the rounding is seen


def test_float8_masks_equal_the_reference_on_rounded_inputs_and_the_extreme_is_dense() -> None:
    generator = torch.Generator().manual_seed(8)
    q = torch.randn(1, 4, 150, 32, generator=generator)
    k = torch.randn(1, 2, 150, 32, generator=generator)
    scale = 32 ** -0.5
    masks = xattention_block_masks(q, k, scale, 16, 4, 0.6, float8_scores=True)
    q8, k8 = (x8.float() * unit[..., None, None] for x8, unit in map(float8_rounded_reference, (q, k)))
    expected = torch.stack([xattention_block_mask_reference(q8[0, h], k8[0, h // 2], scale, 16, 4, 0.6)
                            for h in range(4)])[None]
    assert torch.equal(masks, expected)
    identifier = XATTENTION.build(threshold=1.0, stride=4, block=16, dense_above=1.0, float8_scores=True)
    plan = identifier.identify(q, k, AttentionContext.for_inputs(q, k))
    assert plan.density() == pytest.approx(1.0)
