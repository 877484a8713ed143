"""Stripe attention in Triton: dense windows plus gathered discrete keys, one online softmax.

Executes a :class:`~sparse_prefill.plan.StripePlan`. A program owns ``ROWS`` consecutive query
rows of one query group for ``HEAD_TILE`` query heads that share a key list, stacked along M:
tile row ``m`` is query head ``m // ROWS``, sequence row ``r0 + m % ROWS``. With a plan per KV
head (``plan_heads == Hkv``) the heads of a GQA group share the list, so each K/V tile, contiguous
or gathered, is loaded once and multiplies all of them (Llama 32q/8kv: 4 heads x 32 rows = 128).
With a plan per query head, ``HEAD_TILE`` is 1. K and V are read in place, never expanded.

Per program, in order: the initial window ``[0, sink_end)`` (contiguous), the group's selected
keys (gathered by index, ``BLOCK_N`` per tile), the local window ``[local_start, row]``
(contiguous; the causal mask only on tiles that reach the program's first row).

Equivalent PyTorch code: :func:`sparse_prefill.kernels.reference.stripe_attention_reference`.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from sparse_prefill.kernels.reference import validate_plan_layout
from sparse_prefill.validation import validate_attention_inputs
from sparse_prefill.kernels.runtime import triton_can_run, triton_interpreted
from sparse_prefill.plan import StripePlan

__all__ = ["stripe_attention", "STRIPE_HEAD_DIMS", "STRIPE_DTYPES"]

STRIPE_HEAD_DIMS = (64, 96, 128, 256)
STRIPE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Decided at import, like triton.jit itself decides between compiling and interpreting.
_INTERPRET = triton_interpreted()
_LOG2E = 1.4426950408889634  # scores go through exp2: fold log2(e) into the scale once
_MIN_ROWS = 16  # tl.dot needs every tile dimension >= 16
_MAX_TILE_ROWS = 128  # stacked rows per program: one 128-row MMA tile, as the fused-attention tutorial
_MAX_TILE_ROWS_D256 = 64  # at head dim 256 the q tile and accumulator need twice the registers
_SMEM_BUDGET = 192 * 1024  # Hopper gives 227 KiB per block; Triton needs the rest for layout conversions
_MAX_GRID_X = 2**31 - 1  # CUDA's limit on the first grid axis, the only one the kernel uses


# ---------------------------------------------------------------------------------------------
# Jitted helpers
# ---------------------------------------------------------------------------------------------


@triton.jit
def _load_rows(base, rows, row_ok, stride_n, offs_d, d_ok):
    """[len(rows), BLOCK_D] tile of a row-major [N, D] matrix; masked rows and padded dims read 0."""
    ptrs = base + rows[:, None] * stride_n + offs_d[None, :]
    return tl.load(ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)


@triton.jit
def _mma(a, b, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b accumulated in fp32; UPCAST multiplies in fp32, for the interpreter (see _dot_settings)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def _softmax_update(
    acc, m_i, l_i, q, k, v, allowed, qk_scale,
    MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """Fold one K/V tile into the running accumulator, row max and row sum (scores in log2 units)."""
    s = _mma(q, tl.trans(k), DOT_PRECISION, UPCAST) * qk_scale
    if MASKED:
        s = tl.where(allowed, s, float("-inf"))
    # m_i starts finite, so m_new is finite and a fully masked tile gives p = 0, alpha = 1: no NaN.
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _mma(p.to(v.dtype), v, DOT_PRECISION, UPCAST)
    return acc, m_new, l_i


@triton.jit
def _key_tile(
    acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, keys, key_ok, allowed, offs_d, d_ok, qk_scale,
    MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """Load the K and V rows of ``keys`` (int64; rows not ``key_ok`` read 0) and fold them in."""
    k = _load_rows(k_base, keys, key_ok, stride_kn, offs_d, d_ok)
    v = _load_rows(v_base, keys, key_ok, stride_vn, offs_d, d_ok)
    return _softmax_update(acc, m_i, l_i, q, k, v, allowed, qk_scale, MASKED, DOT_PRECISION, UPCAST)


@triton.jit
def _contiguous_window(
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
        acc, m_i, l_i = _key_tile(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, keys.to(tl.int64), key_ok,
                                  allowed, offs_d, d_ok, qk_scale, CAUSAL or MASK_TAIL, DOT_PRECISION, UPCAST)
    return acc, m_i, l_i


@triton.jit
def _gathered_keys(
    acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, Indices, seg_start, seg_end, offs_n, offs_d, d_ok,
    qk_scale, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """Selected keys Indices[seg_start:seg_end], BLOCK_N per tile, K and V rows loaded by index.

    Whole tiles run without masks; only a last, partial tile masks its missing slots. The next
    tile's indices are loaded one iteration ahead: with the index load in the same iteration,
    Triton's pipeliner waits for every copy in flight before each tile (``async_wait {num = 0}``
    in the TTGIR), so the gather's latency was never hidden; with it ahead, the K/V copies of the
    next tile stay in flight during this one.
    """
    full_end = seg_start + (seg_end - seg_start) // BLOCK_N * BLOCK_N
    whole = offs_n < BLOCK_N  # all true, known at compile time
    upcoming = tl.load(Indices + seg_start + offs_n, mask=seg_start + offs_n < full_end, other=0)
    for slot0 in range(seg_start, full_end, BLOCK_N):
        keys = upcoming.to(tl.int64)
        following = slot0 + BLOCK_N + offs_n
        upcoming = tl.load(Indices + following, mask=following < full_end, other=0)
        acc, m_i, l_i = _key_tile(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, keys, whole, whole[None, :],
                                  offs_d, d_ok, qk_scale, False, DOT_PRECISION, UPCAST)
    if full_end < seg_end:
        slots = full_end + offs_n
        slot_ok = slots < seg_end
        keys = tl.load(Indices + slots, mask=slot_ok, other=0).to(tl.int64)
        acc, m_i, l_i = _key_tile(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, keys, slot_ok,
                                  slot_ok[None, :], offs_d, d_ok, qk_scale, True, DOT_PRECISION, UPCAST)
    return acc, m_i, l_i


# ---------------------------------------------------------------------------------------------
# Autotuning
# ---------------------------------------------------------------------------------------------


def _configs() -> list[triton.Config]:
    """Smallest first (the pruning fallback); one config under the interpreter, which cannot time."""
    if _INTERPRET:
        return [triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_N": block_n}, num_warps=warps, num_stages=stages)
        for block_n in (32, 64, 128)
        for warps in (4, 8)
        for stages in (2, 3, 4)
    ]


def _prune_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drop configs that cannot fit or cannot pay off for this tile shape and dtype."""
    args = {**named_args, **kwargs}
    block_m = args["HEAD_TILE"] * args["ROWS"]
    row_bytes = args["BLOCK_D"] * args["Q"].element_size()
    kept = []
    for config in configs:
        # K and V tiles are buffered num_stages deep in shared memory, beside the q tile.
        if (config.num_stages * 2 * config.kwargs["BLOCK_N"] + block_m) * row_bytes > _SMEM_BUDGET:
            continue
        # Eight warps need 128 stacked rows: with fewer, half of them would have no MMA rows.
        if config.num_warps == 8 and block_m < 128:
            continue
        kept.append(config)
    return kept or configs[:1]


# ---------------------------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------------------------


@triton.autotune(
    configs=_configs(),
    # The autotuner adds the tensors' dtypes itself. length_bucket (a key only, unused in the body):
    # the best tile differs between short and long prompts (BLOCK_N 32 with 4 warps at 16k, 64 with
    # 8 warps at 128k on the H200), so each power of two of the length is tuned once. A new bucket
    # re-times the compiled binaries; it compiles only where an integer argument is in a
    # divisible-by-16 class not seen before (benchmarks/compile_check.py).
    key=["HEAD_DIM", "HEAD_TILE", "ROWS", "length_bucket"],
    prune_configs_by={"early_config_prune": _prune_configs},
)
@triton.jit
def _stripe_fwd(
    Q, K, V, Out, Lse, Offsets, Indices,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    seq_len, length_bucket, num_q_heads, plan_heads, heads_per_plan, q_per_kv, head_chunks,
    group_rows, num_groups, tiles_per_group, sink, local, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_TILE: tl.constexpr, ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr, RETURN_LSE: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    # One grid axis (CUDA allows 2^31 - 1 programs there, 65535 on the second axis, which 16-row
    # tiles pass at 2^20 tokens): program p runs head tile p % head_programs of query tile
    # p // head_programs counted from the end, the order a (heads, tiles) grid launches in.
    # Which rows: tile t of group g covers rows [r0, r0 + ROWS) clipped to the group and sequence.
    # Last groups first, every head of one before the next: they attend the most keys (the dense
    # tail keeps all of them), and a long program launched last would run alone at the end.
    tiles = num_groups * tiles_per_group
    head_programs = tl.num_programs(0) // tiles
    tile = tiles - 1 - tl.program_id(0) // head_programs
    group = tile // tiles_per_group
    group_start = group * group_rows
    r0 = group_start + (tile % tiles_per_group) * ROWS
    row_hi = tl.minimum(tl.minimum(group_start + group_rows, seq_len), r0 + ROWS)
    if r0 >= row_hi:  # a last group shorter than its tiles
        return
    # Which heads: HEAD_TILE consecutive query heads of plan head hp, all reading one KV head.
    pid_bh = tl.program_id(0) % head_programs
    chunk = pid_bh % head_chunks
    hp = (pid_bh // head_chunks) % plan_heads
    b = (pid_bh // head_chunks // plan_heads).to(tl.int64)
    first_head = hp * heads_per_plan + chunk * HEAD_TILE
    kv_head = (first_head // q_per_kv).to(tl.int64)

    offs_m = tl.arange(0, HEAD_TILE * ROWS)
    head_in_tile = offs_m // ROWS
    row_pos = r0 + offs_m % ROWS
    row_ok = (row_pos < row_hi) & (chunk * HEAD_TILE + head_in_tile < heads_per_plan)
    q_head = (first_head + head_in_tile).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

    rows64 = row_pos.to(tl.int64)[:, None]
    q_ptrs = Q + b * stride_qb + q_head[:, None] * stride_qh + rows64 * stride_qn + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b * stride_kb + kv_head * stride_kh
    v_base = V + b * stride_vb + kv_head * stride_vh

    # Group geometry, as StripePlan.group_bounds; the segment of (b, hp, group) in the CSR.
    local_start = tl.maximum(group_start - local, 0)
    sink_end = tl.minimum(sink, local_start)
    segment = (b * plan_heads + hp) * num_groups + group
    seg_start = tl.load(Offsets + segment)
    seg_end = tl.load(Offsets + segment + 1)

    # Finite start: exp2(m_i - m_new) never sees (-inf) - (-inf), even for rows masked so far.
    m_i = tl.full([HEAD_TILE * ROWS], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([HEAD_TILE * ROWS], dtype=tl.float32)
    acc = tl.zeros([HEAD_TILE * ROWS, BLOCK_D], dtype=tl.float32)

    acc, m_i, l_i = _contiguous_window(
        acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, 0, sink_end, row_pos, offs_n, offs_d, d_ok,
        qk_scale, BLOCK_N, False, True, DOT_PRECISION, UPCAST,
    )
    acc, m_i, l_i = _gathered_keys(
        acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, Indices, seg_start, seg_end, offs_n, offs_d, d_ok,
        qk_scale, BLOCK_N, DOT_PRECISION, UPCAST,
    )
    # Local window: whole tiles before r0 precede every row (no mask), the rest needs the causal mask.
    unmasked_end = local_start + (r0 - local_start) // BLOCK_N * BLOCK_N
    acc, m_i, l_i = _contiguous_window(
        acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, local_start, unmasked_end, row_pos, offs_n, offs_d,
        d_ok, qk_scale, BLOCK_N, False, False, DOT_PRECISION, UPCAST,
    )
    acc, m_i, l_i = _contiguous_window(
        acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, unmasked_end, row_hi, row_pos, offs_n, offs_d, d_ok,
        qk_scale, BLOCK_N, True, True, DOT_PRECISION, UPCAST,
    )

    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    o_ptrs = Out + b * stride_ob + q_head[:, None] * stride_oh + rows64 * stride_on + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    if RETURN_LSE:
        lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453  # log2 units back to natural log
        tl.store(Lse + (b * num_q_heads + q_head) * seq_len + row_pos, lse, mask=row_ok)


# ---------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------


def _validate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: StripePlan, scale: float) -> int:
    """Everything the kernel assumes, checked before launch; returns the plan's head count."""
    if not isinstance(plan, StripePlan):
        raise TypeError(f"stripe_attention executes a StripePlan, got {type(plan).__name__}")
    validate_attention_inputs(q, k, v)
    if q.dtype not in STRIPE_DTYPES:
        allowed = ", ".join(str(dtype) for dtype in STRIPE_DTYPES)
        raise TypeError(f"stripe_attention supports dtypes ({allowed}), got {q.dtype}")
    if q.shape[-1] not in STRIPE_HEAD_DIMS:
        raise ValueError(f"stripe_attention supports head dims {STRIPE_HEAD_DIMS}, got {q.shape[-1]}")
    if not triton_can_run(q.device):
        raise ValueError(
            f"stripe_attention runs on CUDA devices, got {q.device}; to run on the CPU (slowly), set "
            "TRITON_INTERPRET=1 before importing triton"
        )
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < math.inf:
        raise ValueError(f"scale must be a positive finite number (usually 1/sqrt(head_dim)), got {scale!r}")
    plan_heads = validate_plan_layout(q, k, plan)
    segments = plan.batch * plan_heads * plan.num_groups
    if plan.offsets.dtype != torch.int64 or plan.indices.dtype != torch.int32 or plan.offsets.numel() != segments + 1:
        raise ValueError(
            f"StripePlan CSR must be int64 offsets of length {segments + 1} and int32 indices, got "
            f"{plan.offsets.dtype} offsets of length {plan.offsets.numel()} and {plan.indices.dtype} indices; "
            "call plan.validate() to locate the problem"
        )
    return plan_heads


def _validate_out(out: torch.Tensor, q: torch.Tensor) -> None:
    if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or out.stride(-1) != 1:
        raise ValueError(
            f"out must match q (shape {tuple(q.shape)}, {q.dtype}, {q.device}) with unit stride along the head dim, "
            f"got shape {tuple(out.shape)}, {out.dtype}, {out.device}, strides {out.stride()}"
        )
    if any(stride == 0 and size > 1 for stride, size in zip(out.stride(), out.shape)):
        # An expanded tensor: every row would write the same memory (PyTorch's out= refuses these too).
        raise ValueError(f"out must not overlap itself, got strides {out.stride()} for shape {tuple(out.shape)}")


def _tile_shape(heads_per_plan: int, group_rows: int, head_dim: int) -> tuple[int, int]:
    """(HEAD_TILE, ROWS): query heads stacked per program, rows per head, at most one MMA tile in all."""
    max_rows = _MAX_TILE_ROWS if head_dim <= 128 else _MAX_TILE_ROWS_D256
    head_tile = min(triton.next_power_of_2(heads_per_plan), max_rows // _MIN_ROWS)
    # Rows that divide group_rows avoid half-empty tiles at group ends (group_rows & -group_rows:
    # its largest power-of-two divisor); other group sizes still work through masking.
    rows = max(_MIN_ROWS, min(max_rows // head_tile, group_rows & -group_rows))
    return head_tile, rows


def _dot_settings(dtype: torch.dtype) -> tuple[str, bool]:
    """(input precision, upcast) for tl.dot: fp32 inputs stay exact (no tf32).

    The interpreter's bf16 tl.dot multiplies the raw bit patterns (triton-lang/triton#11584, "not
    supported yet"), so interpreted bf16 tiles are multiplied in fp32 instead.
    """
    upcast = _INTERPRET and dtype == torch.bfloat16
    if dtype == torch.float32 or upcast:
        return "ieee", upcast
    return "tf32", False  # the default; only fp32 operands read it


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    """The kernel assumes unit stride along the head dim; other strides are passed through."""
    return x if x.stride(-1) == 1 else x.contiguous()


def stripe_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: StripePlan,
    scale: float,
    return_lse: bool = False,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal attention over the keys a StripePlan selects, in one Triton kernel.

    q is [B, Hq, N, D], k and v [B, Hkv, N, D] (GQA read in place); D in STRIPE_HEAD_DIMS, dtype
    in STRIPE_DTYPES, accumulation in float32. ``plan.plan_heads`` is Hq or Hkv. Returns
    (out [B, Hq, N, D] in q's dtype, lse [B, Hq, N] float32 natural log, or None); with ``out``
    (q's shape and dtype, unit stride along D, any other strides) the output is written there.
    """
    # shape constraints
    plan_heads = _validate(q, k, v, plan, scale)
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    batch, num_q, seq_len, head_dim = q.shape
    heads_per_plan = num_q // plan_heads
    head_tile, rows = _tile_shape(heads_per_plan, plan.group_rows, head_dim)
    head_chunks = triton.cdiv(heads_per_plan, head_tile)
    tiles_per_group = triton.cdiv(plan.group_rows, rows)

    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    else:
        _validate_out(out, q)
    lse = torch.empty(batch, num_q, seq_len, dtype=torch.float32, device=q.device) if return_lse else None
    dot_precision, upcast = _dot_settings(q.dtype)
    programs = batch * plan_heads * head_chunks * plan.num_groups * tiles_per_group
    if programs > _MAX_GRID_X:
        raise ValueError(f"{programs} programs (batch x heads x query tiles) pass CUDA's grid limit {_MAX_GRID_X}; "
                         "split the batch")
    # The kernel reads the CSR through raw pointers: a strided view (a plugin's plan) must be made dense.
    offsets, indices = plan.offsets.contiguous(), plan.indices.contiguous()
    _stripe_fwd[(programs,)](
        q, k, v, out, out if lse is None else lse, offsets, indices,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        seq_len, triton.next_power_of_2(seq_len), num_q, plan_heads, heads_per_plan, num_q // k.shape[1], head_chunks,
        plan.group_rows, plan.num_groups, tiles_per_group, plan.sink, plan.local, scale * _LOG2E,
        HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), HEAD_TILE=head_tile, ROWS=rows,
        RETURN_LSE=return_lse, DOT_PRECISION=dot_precision, UPCAST=upcast,
    )
    return out, lse
