"""What the Triton attention kernels share: one online-softmax step over a K/V tile, contiguous key
windows, the launch tile shape, tl.dot settings per dtype and the checks every launcher makes.

The stripe kernel (gathered keys) and the block kernel (contiguous key blocks) differ only in how
they walk the keys; the softmax state, the causal window code and the input rules are one piece of
code here, so a fix to either lands in both. Conventions: scores in log2 units (``qk_scale`` folds
log2(e) into the scale), the running row max starts finite (-1e30) so fully masked tiles give no
NaN, K/V offsets are int64 (N * H * D can pass 2^31).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from sparse_prefill.interfaces import output_like
from sparse_prefill.kernels.reference import validate_plan_layout
from sparse_prefill.kernels.runtime import FP_FUSION, triton_can_run, triton_interpreted
from sparse_prefill.validation import validate_attention_inputs

__all__ = [
    "HEAD_DIMS", "DTYPES", "INTERPRET", "LOG2E", "MAX_GRID_X",
    "load_rows", "mma", "softmax_update", "key_tile", "contiguous_window", "causal_window",
    "program_tile", "program_heads", "load_queries", "initial_state", "store_result",
    "validate_kernel_inputs", "check_csr", "validate_out", "tile_slots", "dot_settings", "last_dim_contiguous",
    "fitting_configs", "launch",
]

HEAD_DIMS = (64, 96, 128, 256)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Decided at import, like triton.jit itself decides between compiling and interpreting.
INTERPRET = triton_interpreted()
LOG2E = 1.4426950408889634  # scores go through exp2: fold log2(e) into the scale once
_MIN_ROWS = 16  # tl.dot needs every tile dimension >= 16
_MAX_TILE_ROWS = 128  # stacked rows per program: one 128-row MMA tile, as the fused-attention tutorial
_MAX_TILE_ROWS_D256 = 64  # at head dim 256 the q tile and accumulator need twice the registers
_SMEM_BUDGET = 192 * 1024  # Hopper gives 227 KiB per block; Triton needs the rest for layout conversions
MAX_GRID_X = 2**31 - 1  # CUDA's limit on the first grid axis, the only one the kernels use


# ---------------------------------------------------------------------------------------------
# Jitted helpers
# ---------------------------------------------------------------------------------------------


@triton.jit
def load_rows(base, rows, row_ok, stride_n, offs_d, d_ok):
    """[len(rows), BLOCK_D] tile of a row-major [N, D] matrix; masked rows and padded dims read 0."""
    ptrs = base + rows[:, None] * stride_n + offs_d[None, :]
    return tl.load(ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)


@triton.jit
def mma(a, b, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b accumulated in fp32; UPCAST multiplies in fp32, for the interpreter (see dot_settings)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def softmax_update(
    acc, m_i, l_i, q, k, v, allowed, qk_scale,
    MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """Fold one K/V tile into the running accumulator, row max and row sum (scores in log2 units)."""
    s = mma(q, tl.trans(k), DOT_PRECISION, UPCAST) * qk_scale
    if MASKED:
        s = tl.where(allowed, s, float("-inf"))
    # m_i starts finite, so m_new is finite and a fully masked tile gives p = 0, alpha = 1: no NaN.
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, DOT_PRECISION, UPCAST)
    return acc, m_new, l_i


@triton.jit
def key_tile(
    acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, keys, key_ok, allowed, offs_d, d_ok, qk_scale,
    MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """Load the K and V rows of ``keys`` (int64; rows not ``key_ok`` read 0) and fold them in."""
    k = load_rows(k_base, keys, key_ok, stride_kn, offs_d, d_ok)
    v = load_rows(v_base, keys, key_ok, stride_vn, offs_d, d_ok)
    return softmax_update(acc, m_i, l_i, q, k, v, allowed, qk_scale, MASKED, DOT_PRECISION, UPCAST)


@triton.jit
def contiguous_window(
    acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, start, end, row_pos, offs_n, offs_d, d_ok, qk_scale,
    BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, MASK_TAIL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Keys [start, end) loaded contiguously; CAUSAL masks key > row, MASK_TAIL masks key >= end."""
    for n0 in range(start, end, BLOCK_N):
        keys = n0 + offs_n
        key_ok = keys < end
        if CAUSAL:
            allowed = keys[None, :] <= row_pos[:, None]
        else:
            allowed = key_ok[None, :]
        acc, m_i, l_i = key_tile(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, keys.to(tl.int64), key_ok,
                                 allowed, offs_d, d_ok, qk_scale, CAUSAL or MASK_TAIL, DOT_PRECISION, UPCAST)
    return acc, m_i, l_i




@triton.jit
def causal_window(
    acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, start, r0, row_hi, row_pos, offs_n, offs_d, d_ok,
    qk_scale, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """Keys [start, row] of every row in [r0, row_hi): whole tiles before r0 precede every row and
    run without a mask; the causal mask only on the tiles from there (keys < row_hi)."""
    unmasked_end = start + (r0 - start) // BLOCK_N * BLOCK_N
    acc, m_i, l_i = contiguous_window(
        acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, start, unmasked_end, row_pos, offs_n, offs_d,
        d_ok, qk_scale, BLOCK_N, False, False, DOT_PRECISION, UPCAST,
    )
    return contiguous_window(
        acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, unmasked_end, row_hi, row_pos, offs_n, offs_d, d_ok,
        qk_scale, BLOCK_N, True, True, DOT_PRECISION, UPCAST,
    )

@triton.jit
def program_tile(units, tiles_per_unit, unit_rows, seq_len, HEADS: tl.constexpr, TILE_M: tl.constexpr):
    """(unit, unit_start, first_slot, slot_end, r0, row_hi, pid_bh): this program's tile of query rows.

    A unit is a query group (stripe) or block (block plan) of ``unit_rows`` rows. Its rows and the
    ``HEADS`` query heads sharing its key list form ``rows x HEADS`` slots, row-major (slot s: row
    s // HEADS, head s % HEADS), cut in ``tiles_per_unit`` tiles of ``TILE_M`` slots; this tile
    holds slots [first_slot, slot_end), rows [r0, row_hi). Any head count fills the tile: 7 heads x
    128 rows are 7 whole tiles of 128, where a power-of-two head tile would pad 7 heads to 8.

    One grid axis (CUDA allows 2^31 - 1 programs there, 65535 on the second): program p runs plan
    head ``pid_bh = p % head_programs`` of tile p // head_programs counted from the end, the order a
    (heads, tiles) grid launches in. Last units first, every head of one before the next: they attend
    the most keys, and a long program launched last would run alone at the end. ``r0 >= row_hi``
    for a tile past a short last unit: the caller returns.
    """
    tiles = units * tiles_per_unit
    head_programs = tl.num_programs(0) // tiles
    tile = tiles - 1 - tl.program_id(0) // head_programs
    unit = tile // tiles_per_unit
    unit_start = unit * unit_rows
    unit_slots = tl.minimum(unit_rows, seq_len - unit_start) * HEADS
    first_slot = (tile % tiles_per_unit) * TILE_M
    slot_end = tl.minimum(first_slot + TILE_M, unit_slots)
    r0 = unit_start + first_slot // HEADS
    row_hi = unit_start + (slot_end + HEADS - 1) // HEADS
    return unit, unit_start, first_slot, slot_end, r0, row_hi, tl.program_id(0) % head_programs


@triton.jit
def program_heads(
    pid_bh, unit_start, first_slot, slot_end, plan_heads, q_per_kv, HEADS: tl.constexpr, TILE_M: tl.constexpr,
):
    """(b, hp, kv_head, q_head, row_pos, row_ok) of each stacked row: the query heads of plan head hp,
    all reading one KV head, and the rows of the tile's slots (see program_tile), slot by slot along M.
    """
    hp = pid_bh % plan_heads
    b = (pid_bh // plan_heads).to(tl.int64)
    first_head = hp * HEADS
    kv_head = (first_head // q_per_kv).to(tl.int64)
    slots = first_slot + tl.arange(0, TILE_M)
    row_pos = unit_start + slots // HEADS
    row_ok = slots < slot_end
    q_head = (first_head + slots % HEADS).to(tl.int64)
    return b, hp, kv_head, q_head, row_pos, row_ok


@triton.jit
def load_queries(Q, b, q_head, row_pos, row_ok, stride_qb, stride_qh, stride_qn, offs_d, d_ok):
    """The stacked q tile [TILE_M, BLOCK_D]; rows not ``row_ok`` and padded dims read 0."""
    rows64 = row_pos.to(tl.int64)[:, None]
    q_ptrs = Q + b * stride_qb + q_head[:, None] * stride_qh + rows64 * stride_qn + offs_d[None, :]
    return tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)


@triton.jit
def initial_state(BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """(acc, m_i, l_i) before any key. A finite start: exp2(m_i - m_new) never sees (-inf) - (-inf),
    even for rows masked so far; a row that never sees a key ends with output 0 and lse -inf."""
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    return acc, m_i, l_i


@triton.jit
def store_result(
    acc, m_i, l_i, Out, Lse, b, q_head, row_pos, row_ok, stride_ob, stride_oh, stride_on, offs_d, d_ok, num_q_heads,
    seq_len, RETURN_LSE: tl.constexpr,
):
    """Normalised output in Out's dtype; with RETURN_LSE the natural-log lse (float32) at [b, head, row]."""
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    rows64 = row_pos.to(tl.int64)[:, None]
    o_ptrs = Out + b * stride_ob + q_head[:, None] * stride_oh + rows64 * stride_on + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    if RETURN_LSE:
        lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453  # log2 units back to natural log; no key: -inf
        tl.store(Lse + (b * num_q_heads + q_head) * seq_len + row_pos, lse, mask=row_ok)

# ---------------------------------------------------------------------------------------------
# Launcher helpers
# ---------------------------------------------------------------------------------------------


def validate_kernel_inputs(kernel: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> None:
    """The input rules of every Triton attention kernel (shapes, dtype, head dim, device, scale)."""
    validate_attention_inputs(q, k, v)
    if q.dtype not in DTYPES:
        allowed = ", ".join(str(dtype) for dtype in DTYPES)
        raise TypeError(f"{kernel} supports dtypes ({allowed}), got {q.dtype}")
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"{kernel} supports head dims {HEAD_DIMS}, got {q.shape[-1]}")
    if not triton_can_run(q.device):
        raise ValueError(
            f"{kernel} runs on CUDA devices, got {q.device}; to run on the CPU (slowly), set "
            "TRITON_INTERPRET=1 before importing triton"
        )
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < math.inf:
        raise ValueError(f"scale must be a positive finite number (usually 1/sqrt(head_dim)), got {scale!r}")


def validate_launch(kernel: str, plan_kind: type, segments_per_head: str, q: torch.Tensor, k: torch.Tensor,
                    v: torch.Tensor, plan: object, scale: float) -> int:
    """Everything a plan kernel assumes, checked before launch without a host sync: the plan's kind, the
    inputs (:func:`validate_kernel_inputs`), the plan's heads against q and k, and its CSR's dtypes and
    length (``plan.batch * heads * getattr(plan, segments_per_head)`` segments). Returns the plan's head count."""
    if not isinstance(plan, plan_kind):
        raise TypeError(f"{kernel} executes a {plan_kind.__name__}, got {type(plan).__name__}")
    validate_kernel_inputs(kernel, q, k, v, scale)
    plan_heads = validate_plan_layout(q, k, plan)
    segments = plan.batch * plan_heads * getattr(plan, segments_per_head)  # type: ignore[attr-defined]
    check_csr(plan_kind.__name__, plan.offsets, plan.indices, segments)  # type: ignore[attr-defined]
    return plan_heads


def check_csr(kind: str, offsets: torch.Tensor, indices: torch.Tensor, segments: int) -> None:
    """The CSR dtypes and length the kernels read through raw pointers (no host sync: values are not read)."""
    if offsets.dtype != torch.int64 or indices.dtype != torch.int32 or offsets.numel() != segments + 1:
        raise ValueError(
            f"{kind} CSR must be int64 offsets of length {segments + 1} and int32 indices, got "
            f"{offsets.dtype} offsets of length {offsets.numel()} and {indices.dtype} indices; "
            "call plan.validate() to locate the problem"
        )


def validate_out(out: torch.Tensor, q: torch.Tensor) -> None:
    if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or out.stride(-1) != 1:
        raise ValueError(
            f"out must match q (shape {tuple(q.shape)}, {q.dtype}, {q.device}) with unit stride along the head dim, "
            f"got shape {tuple(out.shape)}, {out.dtype}, {out.device}, strides {out.stride()}"
        )
    if any(stride == 0 and size > 1 for stride, size in zip(out.stride(), out.shape)):
        # An expanded tensor: every row would write the same memory (PyTorch's out= refuses these too).
        raise ValueError(f"out must not overlap itself, got strides {out.stride()} for shape {tuple(out.shape)}")


def tile_slots(heads_per_plan: int, unit_rows: int, head_dim: int) -> int:
    """TILE_M: (row, head) slots stacked per program (see program_tile), a power of two.

    The largest, up to one MMA tile of 128 rows (64 at head dim 256), whose whole tiles pad a unit's
    ``heads_per_plan x unit_rows`` slots by at most an eighth (7 heads x 128 rows: 7 tiles of 128;
    96 rows of one head: 3 of 32), else the smallest: a larger tile reads each K/V tile for more rows,
    a padded one computes rows nobody reads.
    """
    slots = heads_per_plan * unit_rows
    size = _MAX_TILE_ROWS if head_dim <= 128 else _MAX_TILE_ROWS_D256
    while size > _MIN_ROWS and 8 * (triton.cdiv(slots, size) * size - slots) > slots:
        size //= 2
    return size


def fitting_configs(configs: list[triton.Config], args: dict) -> list[triton.Config]:
    """The configs whose K/V buffers fit shared memory beside the q tile and whose warps all have MMA rows, for
    a launch's arguments ``args`` (TILE_M, BLOCK_D, Q); the first config when none does."""
    block_m = args["TILE_M"]
    row_bytes = args["BLOCK_D"] * args["Q"].element_size()

    def fits_and_pays(config: triton.Config) -> bool:
        # K and V tiles are buffered num_stages deep in shared memory, beside the q tile.
        if (config.num_stages * 2 * config.kwargs["BLOCK_N"] + block_m) * row_bytes > _SMEM_BUDGET:
            return False
        # Eight warps need 128 stacked rows: with fewer, half of them would have no MMA rows.
        return not (config.num_warps == 8 and block_m < 128)

    return [config for config in configs if fits_and_pays(config)] or configs[:1]


def dot_settings(dtype: torch.dtype) -> tuple[str, bool]:
    """(input precision, upcast) for tl.dot: fp32 inputs stay exact (no tf32).

    The interpreter's bf16 tl.dot multiplies the raw bit patterns (triton-lang/triton#11584, "not
    supported yet"), so interpreted bf16 tiles are multiplied in fp32 instead.
    """
    upcast = INTERPRET and dtype == torch.bfloat16
    if dtype == torch.float32 or upcast:
        return "ieee", upcast
    return "tf32", False  # the default; only fp32 operands read it


def last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    """The kernels assume unit stride along the head dim; other strides are passed through."""
    return x if x.stride(-1) == 1 else x.contiguous()


def launch(
    kernel: triton.runtime.Autotuner, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan_heads: int,
    units: int, unit_rows: int, offsets: torch.Tensor, indices: torch.Tensor, scale: float, return_lse: bool,
    out: torch.Tensor | None, unit_args: tuple = (), verdict: torch.Tensor | None = None, **constexprs: object,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run an attention kernel over ``units`` query units (groups or blocks) of ``unit_rows`` rows.

    The kernels share their leading arguments (tensors, strides, head layout, ``units``,
    ``tiles_per_unit``), then take ``unit_args``, the score scale and the constexprs; this sizes
    the tile and the grid, allocates or checks ``out`` and the lse, and launches. With ``verdict``
    (int32, one element) every program first reads it and returns at once when it is 0.
    """
    if verdict is not None and (verdict.dtype != torch.int32 or verdict.numel() != 1 or verdict.device != q.device):
        raise ValueError(f"verdict must be one int32 element on {q.device}, got {verdict.dtype} of "
                         f"{verdict.numel()} elements on {verdict.device}")
    q, k, v = (last_dim_contiguous(x) for x in (q, k, v))
    batch, num_q, seq_len, head_dim = q.shape
    heads_per_plan = num_q // plan_heads
    tile_m = tile_slots(heads_per_plan, unit_rows, head_dim)
    tiles_per_unit = triton.cdiv(unit_rows * heads_per_plan, tile_m)
    if out is None:
        out = output_like(q)
    else:
        validate_out(out, q)
    lse = torch.empty(batch, num_q, seq_len, dtype=torch.float32, device=q.device) if return_lse else None
    dot_precision, upcast = dot_settings(q.dtype)
    programs = batch * plan_heads * units * tiles_per_unit
    if programs > MAX_GRID_X:
        raise ValueError(f"{programs} programs (batch x heads x query tiles) pass CUDA's grid limit {MAX_GRID_X}; "
                         "split the batch")
    # The kernels read the CSR through raw pointers: a strided view (a plugin's plan) must be made dense.
    kernel[(programs,)](
        q, k, v, out, out if lse is None else lse, offsets.contiguous(), indices.contiguous(),
        offsets if verdict is None else verdict,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        seq_len, triton.next_power_of_2(seq_len), num_q, plan_heads, num_q // k.shape[1],
        units, tiles_per_unit, *unit_args, scale * LOG2E,
        HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), HEADS=heads_per_plan, TILE_M=tile_m,
        RETURN_LSE=return_lse, DOT_PRECISION=dot_precision, UPCAST=upcast, CHECK_VERDICT=verdict is not None,
        **constexprs, **FP_FUSION,
    )
    return out, lse
