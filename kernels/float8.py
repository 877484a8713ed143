"""Queries and keys rounded to float8 e4m3 for scores that only rank blocks (xattention's ``float8_scores``).

Each (batch, head) gets one power-of-two scale, the largest that keeps the head's largest finite magnitude within
e4m3's 448: x ~ x8 * unit. A power of two keeps the rounding to e4m3's 3-bit mantissa the only change (any bf16
or float32 number times it is exact), so ``x8 * unit`` is the same number in every dtype the scores may be
computed in. Non-finite inputs stay non-finite (NaN; e4m3 has no infinity): a score built from them is still
recognised as no score, as in the input dtype.

Two Triton kernels (a per-head maximum by atomics, then the scaled copy) read x twice and write a byte per
element; :func:`float8_rounded_reference` is the same in PyTorch, the version they are tested against.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparse_prefill.kernels.runtime import FP_FUSION

__all__ = ["FLOAT8_MAX", "float8_rounded", "float8_rounded_reference", "float8_values", "float8_dot_supported"]

FLOAT8_MAX = 448.0  # e4m3's largest finite value
_EXPONENT_RANGE = 126  # scales stay normal float32 numbers (2^+-126)
_ROWS = 64


def float8_dot_supported(device: torch.device) -> bool:
    """Whether tensor cores multiply float8 here: CUDA compute capability 8.9 (Ada, Hopper) or newer, and the
    interpreter (which computes any dot in numpy)."""
    if device.type != "cuda":
        return True
    return torch.cuda.get_device_capability(device) >= (8, 9)


def _unit_exponent(top: torch.Tensor) -> torch.Tensor:
    """The power of two e with top * 2^e <= 448 largest, per head (0 where a head has no nonzero finite value)."""
    exponent = torch.floor(torch.log2(FLOAT8_MAX / torch.where(top > 0, top, FLOAT8_MAX)))
    exponent = exponent.clamp(-_EXPONENT_RANGE, _EXPONENT_RANGE)
    return exponent - (top * torch.exp2(exponent) > FLOAT8_MAX).float()  # log2's last bit, either way


def float8_rounded_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x8 [B, H, N, D] float8 e4m3, unit [B, H] float32): x rounded per head, x8 * unit ~ x."""
    values = x.float()
    finite = torch.isfinite(values)
    top = torch.where(finite, values.abs(), 0.0).amax(dim=(2, 3))
    exponent = _unit_exponent(top)
    scaled = torch.where(finite, values * torch.exp2(exponent)[..., None, None], float("nan"))
    return scaled.to(torch.float8_e4m3fn), torch.exp2(-exponent)


def float8_values(x8: torch.Tensor, unit: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x8 * unit`` (a rounding's two parts) as ``dtype``: exact in bfloat16 and float32, whose exponents hold any
    power-of-two unit."""
    return x8.to(dtype) * unit[..., None, None].to(dtype)


@triton.jit
def _program_rows(X, stride_b, stride_h, stride_n, num_heads, seq_len,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr):
    """(bh, rows, offs_d, inside, x): the ROWS rows of x [B, H, N, D] this program reads, of (batch, head) bh,
    as float32 (0 outside the sequence and the head dim), the layout both kernels below walk."""
    bh = tl.program_id(1)
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    offs_d = tl.arange(0, BLOCK_D)
    inside = (rows < seq_len)[:, None] & (offs_d < HEAD_DIM)[None, :]
    base = X + (bh // num_heads).to(tl.int64) * stride_b + (bh % num_heads).to(tl.int64) * stride_h
    x = tl.load(base + rows.to(tl.int64)[:, None] * stride_n + offs_d[None, :], mask=inside, other=0.0)
    return bh, rows, offs_d, inside, x.to(tl.float32)


@triton.jit
def _head_maximum_kernel(X, Top, stride_b, stride_h, stride_n, num_heads, seq_len,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr):
    """Top[bh] = max(Top[bh], the largest finite |x| of this program's rows)."""
    bh, rows, offs_d, inside, x = _program_rows(X, stride_b, stride_h, stride_n, num_heads, seq_len, HEAD_DIM,
                                                BLOCK_D, ROWS)
    magnitude = tl.abs(x)
    magnitude = tl.where(magnitude < float("inf"), magnitude, 0.0)  # NaN and infinity: not counted
    tl.atomic_max(Top + bh, tl.max(tl.max(magnitude, 1), 0))


@triton.jit
def _round_to_e4m3(x):
    """x (float32, |x| <= 448) rounded to e4m3's nearest value, ties to even, still in float32: the cast after it
    is then exact (the interpreter's own float32 -> e4m3 cast does not round to nearest)."""
    biased = (x.to(tl.int32, bitcast=True) >> 23) & 0xFF
    # Spacing of e4m3 values at |x|: 3 mantissa bits below x's exponent, subnormal (2^-9) under 2^-6.
    spacing = ((tl.maximum(biased, 127 - 6) - 3) << 23).to(tl.float32, bitcast=True)
    magic = spacing * 12582912.0  # 1.5 * 2^23 spacings: float32's own rounding lands on multiples of spacing
    return (x + magic) - magic


@triton.jit
def _scaled_copy_kernel(X, Y, Exponent, stride_b, stride_h, stride_n, num_heads, seq_len,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr):
    """Y = x * 2^Exponent[bh] as float8 e4m3 bits (Y contiguous uint8 [B, H, N, HEAD_DIM]); NaN where x is not
    finite."""
    bh, rows, offs_d, inside, x = _program_rows(X, stride_b, stride_h, stride_n, num_heads, seq_len, HEAD_DIM,
                                                BLOCK_D, ROWS)
    finite = tl.abs(x) < float("inf")
    rounded = _round_to_e4m3(tl.where(finite, x, 0.0) * tl.exp2(tl.load(Exponent + bh)))
    # e4m3's NaN (0x7f) written as bits: casting a NaN is not NaN under the interpreter.
    bits = tl.where(finite, rounded.to(tl.float8e4nv).to(tl.uint8, bitcast=True), 0x7F)
    out = Y + bh.to(tl.int64) * seq_len * HEAD_DIM + rows.to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(out, bits.to(tl.uint8), mask=inside)


def float8_rounded(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`float8_rounded_reference` in two Triton kernels (x [B, H, N, D] with unit stride along D)."""
    batch, heads, seq_len, head_dim = x.shape
    top = torch.zeros(batch * heads, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(seq_len, _ROWS), batch * heads)
    shape = dict(HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), ROWS=_ROWS)
    strides = (x.stride(0), x.stride(1), x.stride(2), heads, seq_len)
    _head_maximum_kernel[grid](x, top, *strides, **shape, **FP_FUSION)
    exponent = _unit_exponent(top)
    out = torch.empty(batch, heads, seq_len, head_dim, dtype=torch.uint8, device=x.device)
    _scaled_copy_kernel[grid](x, out, exponent, *strides, **shape, **FP_FUSION)
    return out.view(torch.float8_e4m3fn), torch.exp2(-exponent).view(batch, heads)
