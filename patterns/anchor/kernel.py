"""AnchorAttention identifier (stages 1-2) in Triton, producing a :class:`~sparse_prefill.plan.StripePlan`.

Same result as :func:`sparse_prefill.patterns.anchor.reference.anchor_identify_reference` (up to fp32
rounding at exact threshold ties), in three kernels that never materialise anything O(N^2):

1. ``_anchor_pool_kernel``, one program per (batch, query head, query block): the row max of
   ``scale * q . k`` over the row's window keys (QK^T only, no PV), averaged over the block's rows
   -> pooled_anchor [B, Hq, NB]; and the mean q row -> pooled_q [B, Hq, NB, D], both fp32. Rows with
   a non-finite q or anchor stay out of both means (the reference's rule).
2. ``_stripe_scan_kernel`` (WRITE=False): scores candidate key tiles against pooled rows stacked in M, stores
   each segment's kept keys as a bit row (1 bit per candidate key: a 32nd of the int32 index list at
   density 1, a third at the 0.09 of long real-calibrated prompts) and counts, per segment (batch, plan
   head, group) and key slice, the keys that any of the segment's rows keeps. A segment owns
   group_blocks x shared-heads rows; one program stacks the segments of every plan head of one KV
   head over consecutive groups (~128 rows), so each K tile is loaded once for all of them, and takes
   one slice of the key axis, so programs stay many and equally loaded at any length.
3. ``_stripe_scan_kernel`` (WRITE=True): the same programs expand the bit rows into kept keys, ascending,
   from each (segment, slice) offset, without scoring again: the host takes one cumsum over the
   counts in (segment, slice) order between 2 and 3, whose every ``num_slices``-th entry is the
   plan's CSR offsets; one sync sizes the buffer.

The bit rows grow as N^2 / (2 x group_rows) bits per plan head: 64 MiB at 128k for Llama-3.1-8B with
shared lists, but 4 GiB at 1M. Beyond a tenth of q+k+v's bytes (``_KEEP_BITS_FRACTION``; for that
shape past ~300k tokens with shared lists, ~80k per query head) no bits are kept (BITS=False) and
kernel 3 scores every candidate again instead, so memory stays linear in N beside the plan.

Sequence length, scale and theta are runtime arguments, so new lengths do not recompile. Theta is read per
query head (a float32 vector), so head groups calibrated to different thetas run in one call.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
import triton
import triton.language as tl

from sparse_prefill.interfaces import PlanBudgetExceeded
from sparse_prefill.kernels.runtime import FP_FUSION, host_copy, triton_can_run, triton_interpreted
from sparse_prefill.patterns.anchor.reference import head_thetas, validate_anchor_inputs
from sparse_prefill.plan import DensePlan, PendingPlan, StripePlan

__all__ = ["anchor_identify", "not_supported_reasons", "SUPPORTED_DTYPES", "HEAD_DIM_RANGE", "MAX_BLOCK", "MAX_SCAN_ROWS"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HEAD_DIM_RANGE = (16, 256)  # tl.dot needs K >= 16; above 256 the q tile no longer fits on chip
MAX_BLOCK = 128  # kernel 1 holds one block's q rows and a BLOCK_N score tile in registers
MAX_SCAN_ROWS = 128  # kernels 2-3 hold a program's stacked pooled rows (and their score tile) in registers
# Pooled rows stacked per scan program: each K tile loaded then serves all of them, so K is read
# N / (128 x block) times per KV head instead of once per pooled row. Splitting the key axis into
# slices keeps the grid large however many rows a program stacks.
_SCAN_ROWS = 128
# Keys per scan program: about 1/16 of the sequence, a power of two between these bounds. The lower
# bound is at least the largest scan BLOCK_N, so slices start on tile (and keep-bit word) boundaries.
_SLICE_KEYS_RANGE = (512, 8192)
# Keep bits may take this fraction of q, k and v's bytes (see the module docstring).
_KEEP_BITS_FRACTION = 0.1
# fp32 operands (fp32 inputs; 16-bit ones take the hi + lo split, _split_pooled_q) on tensor cores in
# tf32: 10-bit mantissas, score error ~1e-3 relative, far below theta's scale; the sums and the
# theta comparison stay fp32. tf32x3 (fp32-exact) made identification ~3x slower on the H200. The
# interpreter computes every dot in numpy fp32 and needs no choice.
_FP32_DOT_PRECISION = "ieee" if triton_interpreted() else "tf32"


@triton.jit
def _window_row_max(
    q, m_i, rows, k_base, stride_kn, stride_kd, key_lo, key_hi, scale,
    CAUSAL: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Running row max of scale * q . k over keys [key_lo, key_hi) (and key <= row when CAUSAL)."""
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    for start_n in range(key_lo, key_hi, BLOCK_N):
        keys = start_n + tl.arange(0, BLOCK_N)
        k_ptrs = k_base + keys[:, None].to(tl.int64) * stride_kn + offs_d[None, :] * stride_kd
        k = tl.load(k_ptrs, mask=(keys[:, None] < key_hi) & (offs_d[None, :] < HEAD_DIM), other=0.0)
        if DOT_FP32:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        valid = keys[None, :] < key_hi
        if CAUSAL:
            valid = valid & (keys[None, :] <= rows[:, None])
        # tl.max and tl.maximum ignore NaN (maxnum, on the GPU and in the interpreter): NaN scores do not
        # count, and a row of NaN scores only (a non-finite q) keeps -inf, as the reference's rule says.
        m_i = tl.maximum(m_i, tl.max(tl.where(valid, s, float("-inf")), 1))
    return m_i


@triton.jit
def _group_windows(group, group_rows, sink, local):
    """(sink_end, local_start) of a query group, as StripePlan.group_bounds defines them."""
    local_start = tl.maximum(group * group_rows - local, 0)
    return tl.minimum(sink, local_start), local_start


@triton.jit
def _segment_of(slot, chunk, off_kv, plan_heads_per_kv, groups_per_chunk, num_groups):
    """(plan head, group, valid) of a program's segment slot: slot = local plan head * groups_per_chunk + group offset."""
    plan_head = off_kv * plan_heads_per_kv + slot // groups_per_chunk
    group = chunk * groups_per_chunk + slot % groups_per_chunk
    return plan_head, group, (slot < plan_heads_per_kv * groups_per_chunk) & (group < num_groups)


@triton.jit
def _load_pooled_rows(
    PooledQ, PooledAnchor, Theta, off_b, off_kv, chunk,
    stride_pb, stride_ph, stride_pm, stride_pd, stride_ab, stride_ah, stride_am,
    plan_heads_per_kv, groups_per_chunk, num_groups, heads_per_plan, group_blocks, num_blocks,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, SEG_PAD: tl.constexpr, ROW_PAD: tl.constexpr,
):
    """The program's pooled rows stacked in M: row m is row m % ROW_PAD of segment slot m // ROW_PAD.

    Within a segment, row r is block r % group_blocks of the plan head's query head r // group_blocks.
    Returns (pooled q, anchor, theta of the row's query head, valid).
    """
    offs_m = tl.arange(0, SEG_PAD * ROW_PAD)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    plan_head, group, valid = _segment_of(offs_m // ROW_PAD, chunk, off_kv, plan_heads_per_kv, groups_per_chunk, num_groups)
    row = offs_m % ROW_PAD
    head = plan_head * heads_per_plan + row // group_blocks
    blk = group * group_blocks + row % group_blocks
    valid = valid & (row < heads_per_plan * group_blocks) & (blk < num_blocks)
    base_q = PooledQ + off_b.to(tl.int64) * stride_pb + head.to(tl.int64) * stride_ph + blk.to(tl.int64) * stride_pm
    pooled_q = tl.load(base_q[:, None] + offs_d[None, :] * stride_pd, mask=valid[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    base_a = PooledAnchor + off_b.to(tl.int64) * stride_ab + head.to(tl.int64) * stride_ah + blk.to(tl.int64) * stride_am
    anchor = tl.load(base_a, mask=valid, other=float("inf"))
    theta = tl.load(Theta + head, mask=valid, other=0.0)
    # A block with no finite row (anchor +inf, see _anchor_pool_kernel) keeps nothing.
    return pooled_q, anchor, theta, valid & (anchor < float("inf"))


@triton.jit
def _program_segments(
    chunk, off_b, off_kv, num_plan_heads, plan_heads_per_kv, groups_per_chunk, num_groups, group_rows, sink, local,
    tail_start, SEG_PAD: tl.constexpr,
):
    """Per segment slot [SEG_PAD]: CSR segment id, sink_end, local_start, valid, keep_all (the group
    reaches past tail_start); and the union key range to scan."""
    plan_head, group, valid = _segment_of(tl.arange(0, SEG_PAD), chunk, off_kv, plan_heads_per_kv, groups_per_chunk, num_groups)
    sink_end, local_start = _group_windows(group, group_rows, sink, local)
    segment = (off_b * num_plan_heads + plan_head).to(tl.int64) * num_groups + group
    key_lo = tl.min(tl.where(valid, sink_end, local_start), 0)
    key_hi = tl.max(tl.where(valid, local_start, 0), 0)
    keep_all = valid & ((group + 1) * group_rows > tail_start)  # padded slots must never write
    return segment, sink_end, local_start, valid, keep_all, key_lo, key_hi


@triton.jit
def _keep_tile(
    q_hi, q_lo, anchor, theta, row_valid, k_base, stride_kn, stride_kd, keys, key_lo, key_hi, sink_end, local_start,
    keep_all, scale, SPLIT: tl.constexpr, PRECISION: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr, SEG_PAD: tl.constexpr, ROW_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """keep [SEG_PAD, BLOCK_N]: a segment keeps key j in [key_lo, key_hi) if any of its rows has
    score + theta >= anchor (theta per row: its query head's), and every candidate when keep_all. Scores as
    in _split_pooled_q."""
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    k_ptrs = k_base + keys[:, None].to(tl.int64) * stride_kn + offs_d[None, :] * stride_kd
    k = tl.load(k_ptrs, mask=(keys[:, None] < key_hi) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    if SPLIT:
        s = (tl.dot(q_hi, tl.trans(k)) + tl.dot(q_lo, tl.trans(k))) * scale
    else:
        s = tl.dot(q_hi, tl.trans(k.to(tl.float32)), input_precision=PRECISION) * scale
    # "not below": a NaN score (a non-finite key) keeps the key, so its NaN reaches the rows that attend
    # it, as in dense attention (one unordered compare, no extra NaN test).
    hit = ((~(s + theta[:, None] < anchor[:, None])) & row_valid[:, None]).to(tl.int32)
    segment_hit = tl.max(tl.reshape(hit, (SEG_PAD, ROW_PAD, BLOCK_N)), 1)
    in_slice = (keys >= key_lo) & (keys < key_hi)
    candidate = (keys[None, :] >= sink_end[:, None]) & (keys[None, :] < local_start[:, None]) & in_slice[None, :]
    return ((segment_hit > 0) | keep_all[:, None]) & candidate


@triton.jit
def _split_pooled_q(pooled_q, dtype: tl.constexpr, SPLIT: tl.constexpr):
    """(hi, lo) with hi + lo = the fp32 pooled query to about 16 mantissa bits, both in K's 16-bit
    dtype when SPLIT: two 16-bit MMAs on K as loaded beat one tf32 MMA on an fp32 copy of each K
    tile, and lose less (tf32 keeps 10 bits). Without SPLIT (fp32 K, the interpreter's bf16): (q, q)."""
    if SPLIT:
        hi = pooled_q.to(dtype)
        lo = (pooled_q - hi.to(tl.float32)).to(dtype)
    else:
        hi = pooled_q
        lo = pooled_q
    return hi, lo


@triton.jit
def _bit_rows(segment, words_per_step, num_groups):
    """(first word, words) of each segment's keep-bit row. Group g's row covers keys [0, g x group_rows),
    its candidates' upper bound, in g x words_per_step uint32 words; the rows of one (batch, plan head)
    lie back to back, so it takes words_per_step x G(G-1)/2 words in all: half the square, causal."""
    plan_head = segment // num_groups  # segment = (batch x plan heads + plan head) x G + group
    group = segment % num_groups
    # tl.cast, not .to(): Triton passes an int argument equal to 1 as a plain constant (one group: a prompt no
    # longer than group_rows), which has no .to().
    head_words = words_per_step * tl.cast(num_groups, tl.int64) * (num_groups - 1) // 2
    return plan_head * head_words + words_per_step * group * (group - 1) // 2, words_per_step * group


@triton.jit
def _pack_bits(keep, SEG_PAD: tl.constexpr, BLOCK_N: tl.constexpr):
    """keep [SEG_PAD, BLOCK_N] -> words [SEG_PAD, BLOCK_N // 32], key j of a word in bit j % 32."""
    bits = tl.reshape(keep.to(tl.uint32), (SEG_PAD, BLOCK_N // 32, 32))
    words = tl.sum(bits << tl.arange(0, 32).to(tl.uint32)[None, None, :], 2)  # distinct bits: the sum is an OR
    return words.to(tl.int32, bitcast=True)  # stored in an int32 buffer (torch has few uint32 ops)


@triton.jit
def _unpack_bits(words, SEG_PAD: tl.constexpr, BLOCK_N: tl.constexpr):
    """The inverse of _pack_bits: int32 words [SEG_PAD, BLOCK_N // 32] -> int32 0/1 [SEG_PAD, BLOCK_N]."""
    words = words.to(tl.uint32, bitcast=True)  # logical shifts
    bits = (words[:, :, None] >> tl.arange(0, 32).to(tl.uint32)[None, None, :]) & 1
    return tl.reshape(bits, (SEG_PAD, BLOCK_N)).to(tl.int32)


def _configs() -> list[triton.Config]:
    """One small config under the interpreter (numpy runs each program; tuning there means nothing)."""
    if triton_interpreted():
        return [triton.Config({"BLOCK_N": 32}, num_warps=4)]
    return [triton.Config({"BLOCK_N": n}, num_warps=w) for n in (32, 64, 128, 256) for w in (4, 8)]


def _prune_score_tiles(configs: list[triton.Config], named_args: dict, **kwargs: int) -> list[triton.Config]:
    """Drop BLOCK_N whose fp32 score tile (rows x BLOCK_N) exceeds 128 x 128: larger tiles spill registers."""
    rows = kwargs["BLOCK_M"] if "BLOCK_M" in kwargs else kwargs["SEG_PAD"] * kwargs["ROW_PAD"]
    return [c for c in configs if rows * c.kwargs["BLOCK_N"] <= 128 * 128] or configs[:1]


@triton.autotune(_configs(), key=["HEAD_DIM_PAD", "BLOCK_M"], prune_configs_by={"early_config_prune": _prune_score_tiles})
@triton.jit
def _anchor_pool_kernel(
    Q, K, PooledQ, PooledAnchor,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_pb, stride_ph, stride_pm, stride_pd,
    stride_ab, stride_ah, stride_am,
    num_q_heads, gqa_size, seq_len, block, group_rows, sink, local, scale,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = off_bh // num_q_heads
    off_h = off_bh % num_q_heads
    row_start = start_m * block
    row_end = tl.minimum(row_start + block, seq_len)
    sink_end, local_start = _group_windows(row_start // group_rows, group_rows, sink, local)
    rows = row_start + tl.arange(0, BLOCK_M)
    row_valid = rows < row_end
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    q_ptrs = (
        Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
        + rows[:, None].to(tl.int64) * stride_qn + offs_d[None, :] * stride_qd
    )
    q = tl.load(q_ptrs, mask=row_valid[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    # GQA: read the shared KV head in place, never an expanded copy.
    k_base = K + off_b.to(tl.int64) * stride_kb + (off_h // gqa_size).to(tl.int64) * stride_kh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    m_i = _window_row_max(q, m_i, rows, k_base, stride_kn, stride_kd, 0, sink_end, scale,
                          False, DOT_FP32, PRECISION, HEAD_DIM, HEAD_DIM_PAD, BLOCK_N)
    m_i = _window_row_max(q, m_i, rows, k_base, stride_kn, stride_kd, local_start, row_end, scale,
                          True, DOT_FP32, PRECISION, HEAD_DIM, HEAD_DIM_PAD, BLOCK_N)
    # Only rows with finite q and anchor join the pool: one NaN row must not change its neighbours'
    # selection (it stays NaN in its own output). |x| < inf is false for NaN and +-inf.
    q32 = q.to(tl.float32)
    q_finite = tl.min((tl.abs(q32) < float("inf")).to(tl.int32), 1) > 0
    pooled = row_valid & q_finite & (tl.abs(m_i) < float("inf"))
    count = tl.sum(pooled.to(tl.float32), 0)
    anchor = tl.sum(tl.where(pooled, m_i, 0.0), 0) / tl.maximum(count, 1.0)
    anchor = tl.where(count > 0, anchor, float("inf"))  # no finite row: the block keeps nothing
    pooled_q = tl.sum(tl.where(pooled[:, None], q32, 0.0), 0) / tl.maximum(count, 1.0)
    out_q = PooledQ + off_b.to(tl.int64) * stride_pb + off_h.to(tl.int64) * stride_ph + start_m.to(tl.int64) * stride_pm
    tl.store(out_q + offs_d * stride_pd, pooled_q, mask=offs_d < HEAD_DIM)
    tl.store(PooledAnchor + off_b.to(tl.int64) * stride_ab + off_h.to(tl.int64) * stride_ah + start_m * stride_am, anchor)


@triton.autotune(_configs(), key=["HEAD_DIM_PAD", "SEG_PAD", "ROW_PAD", "WRITE", "BITS", "SPLIT"],
                 prune_configs_by={"early_config_prune": _prune_score_tiles})
@triton.jit
def _stripe_scan_kernel(
    PooledQ, PooledAnchor, Theta, K, Bits, Offsets, Out,
    stride_pb, stride_ph, stride_pm, stride_pd,
    stride_ab, stride_ah, stride_am,
    stride_kb, stride_kh, stride_kn, stride_kd,
    num_kv_heads, num_plan_heads, plan_heads_per_kv, groups_per_chunk, num_groups,
    heads_per_plan, group_blocks, num_blocks, group_rows, sink, local, tail_start, scale,
    slice_keys, num_slices, words_per_step, capacity,
    SPLIT: tl.constexpr, PRECISION: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    SEG_PAD: tl.constexpr, ROW_PAD: tl.constexpr, BLOCK_N: tl.constexpr, WRITE: tl.constexpr, BITS: tl.constexpr,
):
    """Kernels 2 and 3 for one (group chunk, key slice, batch x KV head). WRITE=False scores the slice,
    stores each segment's keep bits in Bits (when BITS) and the kept-key count of each (segment,
    slice) in Out; WRITE=True writes the kept keys (the CSR indices, Out), ascending, from the
    (segment, slice) offsets in Offsets: expanded from the bits when BITS, else scored again; never at
    or past ``capacity`` (Out's length: a key list written before its size was read may not fit)."""
    chunk = tl.program_id(0)
    key_slice = tl.program_id(1)
    off_b = tl.program_id(2) // num_kv_heads
    off_kv = tl.program_id(2) % num_kv_heads
    segment, sink_end, local_start, valid, keep_all, key_lo, key_hi = _program_segments(
        chunk, off_b, off_kv, num_plan_heads, plan_heads_per_kv, groups_per_chunk, num_groups, group_rows, sink, local,
        tail_start, SEG_PAD,
    )
    key_lo = tl.maximum(key_lo, key_slice * slice_keys)
    key_hi = tl.minimum(key_hi, (key_slice + 1) * slice_keys)
    if key_lo >= key_hi:  # past the chunk's causal range: counts were zeroed by the host
        return
    first_word, row_words = _bit_rows(segment, words_per_step, num_groups)
    slot = segment * num_slices + key_slice
    if WRITE:
        cursor = tl.load(Offsets + slot, mask=valid, other=0)
    else:
        cursor = tl.zeros([SEG_PAD], dtype=tl.int64)
    if not (WRITE and BITS):  # this pass scores
        pooled_q, anchor, theta, row_valid = _load_pooled_rows(
            PooledQ, PooledAnchor, Theta, off_b, off_kv, chunk,
            stride_pb, stride_ph, stride_pm, stride_pd, stride_ab, stride_ah, stride_am,
            plan_heads_per_kv, groups_per_chunk, num_groups, heads_per_plan, group_blocks, num_blocks,
            HEAD_DIM, HEAD_DIM_PAD, SEG_PAD, ROW_PAD,
        )
        q_hi, q_lo = _split_pooled_q(pooled_q, K.dtype.element_ty, SPLIT)
        # Every segment of this program reads the same KV head: each K tile is loaded once for all of them.
        k_base = K + off_b.to(tl.int64) * stride_kb + off_kv.to(tl.int64) * stride_kh
    # Tiles start on a multiple of BLOCK_N, so each covers whole bit words; keys outside the slice stay unkept.
    for start_n in range(key_lo // BLOCK_N * BLOCK_N, key_hi, BLOCK_N):
        keys = start_n + tl.arange(0, BLOCK_N)
        words = start_n // 32 + tl.arange(0, BLOCK_N // 32)
        word_ptrs = Bits + first_word[:, None] + words[None, :]
        word_ok = valid[:, None] & (words[None, :] < row_words[:, None])
        if WRITE and BITS:
            in_slice = (keys >= key_lo) & (keys < key_hi)
            keep = _unpack_bits(tl.load(word_ptrs, mask=word_ok, other=0), SEG_PAD, BLOCK_N) * in_slice[None, :]
        else:
            keep = _keep_tile(q_hi, q_lo, anchor, theta, row_valid, k_base, stride_kn, stride_kd, keys, key_lo, key_hi,
                              sink_end, local_start, keep_all, scale,
                              SPLIT, PRECISION, HEAD_DIM, HEAD_DIM_PAD, SEG_PAD, ROW_PAD, BLOCK_N).to(tl.int32)
        if BITS and not WRITE:
            # Slices start on multiples of slice_keys (>= BLOCK_N), so no other program writes these words.
            # Every word holding a key of [key_lo, key_hi) is written here; the expansion, which may tile
            # with another BLOCK_N, keeps only keys of that range, so the words it reads beyond are never used.
            tl.store(word_ptrs, _pack_bits(keep, SEG_PAD, BLOCK_N), mask=word_ok)
        if WRITE:
            # An inclusive prefix sum along the keys places each kept key after the ones before it: ascending order.
            slots = cursor[:, None] + tl.cumsum(keep, 1) - 1
            fits = (keep > 0) & (slots < capacity)
            tl.store(Out + slots, tl.broadcast_to(keys[None, :], (SEG_PAD, BLOCK_N)), mask=fits)
        cursor += tl.sum(keep, 1)
    if not WRITE:
        tl.store(Out + slot, cursor.to(tl.int32), mask=valid)


@dataclasses.dataclass(frozen=True)
class _ScanLayout:
    """How kernels 2-3 stack segments: the plan heads of one KV head x ``groups_per_chunk`` groups per program."""

    plan_heads_per_kv: int
    groups_per_chunk: int
    seg_pad: int  # segment slots per program, a power of two
    row_pad: int  # pooled rows per segment slot (group_blocks x shared query heads), a power of two

    @property
    def rows(self) -> int:
        return self.seg_pad * self.row_pad


def _scan_layout(plan_heads_per_kv: int, rows_per_segment: int, head_dim: int) -> _ScanLayout:
    """Stack consecutive groups until a program holds about _SCAN_ROWS pooled rows (half at head dim
    above 128, whose fp32 pooled rows take twice the registers)."""
    row_pad = triton.next_power_of_2(rows_per_segment)
    target = _SCAN_ROWS if head_dim <= 128 else _SCAN_ROWS // 2
    groups = max(1, target // (row_pad * plan_heads_per_kv))
    return _ScanLayout(plan_heads_per_kv, groups, triton.next_power_of_2(plan_heads_per_kv * groups), row_pad)


def _scan_rows(num_q: int, num_kv: int, head_dim: int, group_blocks: int, share_kv_heads: bool) -> int:
    """Pooled rows one scan program stacks (kernels 2-3) for this head layout."""
    heads_per_plan = num_q // num_kv if share_kv_heads else 1
    return _scan_layout(num_q // num_kv // heads_per_plan, group_blocks * heads_per_plan, head_dim).rows


def not_supported_reasons(num_q_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, *, block: int,
                          group_blocks: int, share_kv_heads: bool) -> list[str]:
    """Why this identifier cannot take inputs of this layout (empty: it can); each reason says what would.

    The AnchorIdentifier asks before every call and, given a reason, identifies with the PyTorch
    reference instead (the same plan up to fp32 rounding at threshold ties, without ``max_plan_bytes``),
    so a policy that loads never fails in the middle of a generation.
    """
    reasons = []
    if dtype not in SUPPORTED_DTYPES:
        reasons.append(f"dtype {dtype} not in {[str(d) for d in SUPPORTED_DTYPES]}: run the model in one of them")
    low, high = HEAD_DIM_RANGE
    if not low <= head_dim <= high:
        reasons.append(f"head dim must be in [{low}, {high}], got {head_dim} (the model's: no setting changes it)")
    if block > MAX_BLOCK:
        reasons.append(f"block must be <= {MAX_BLOCK} rows, got {block}: pool fewer rows")
    rows = _scan_rows(num_q_heads, num_kv_heads, head_dim, group_blocks, share_kv_heads)
    if rows > MAX_SCAN_ROWS:
        fit, top = 0, group_blocks - 1  # bisect the largest group_blocks that fits (rows grow with it), 0 if none
        while fit < top:
            mid = (fit + top + 1) // 2
            if _scan_rows(num_q_heads, num_kv_heads, head_dim, mid, share_kv_heads) <= MAX_SCAN_ROWS:
                fit = mid
            else:
                top = mid - 1
        fix = f"use group_blocks <= {fit}" if fit else "no group_blocks fits this many query heads per KV head"
        reasons.append(
            f"group_blocks={group_blocks} with {num_q_heads // num_kv_heads} query heads per KV head "
            f"(share_kv_heads={share_kv_heads}) stacks {rows} pooled rows per program (powers of two), "
            f"must be <= {MAX_SCAN_ROWS}: {fix}"
        )
    return reasons


def _validate_kernel_inputs(q: torch.Tensor, k: torch.Tensor, *, block: int, group_blocks: int,
                            share_kv_heads: bool) -> None:
    """What this kernel supports beyond the shared anchor checks; raises with the received value and the fix."""
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype:
        raise TypeError(f"q and k must share one dtype of {SUPPORTED_DTYPES}, got {q.dtype} and {k.dtype}")
    if not triton_can_run(q.device):
        raise ValueError(f"q and k must be on cuda, or on cpu with TRITON_INTERPRET=1, got {q.device}")
    reasons = not_supported_reasons(q.shape[1], k.shape[1], q.shape[-1], q.dtype, block=block,
                                    group_blocks=group_blocks, share_kv_heads=share_kv_heads)
    if reasons:
        raise ValueError("; ".join(reasons) + "; or call anchor_identify_reference, which takes any of these")


def _interpreter_cannot_dot(dtype: torch.dtype) -> bool:
    """The interpreter's tl.dot multiplies raw bfloat16 bit patterns (triton-lang/triton#11584): upcast first.

    fp32 products of bf16 values are exact, so the result matches a native bf16 dot with fp32 accumulation.
    """
    return dtype == torch.bfloat16 and triton_interpreted()


def _pool_blocks(q: torch.Tensor, k: torch.Tensor, *, scale: float, block: int, group_rows: int, sink: int, local: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 1 and pooling (kernel 1): pooled_q [B, Hq, NB, D] and pooled_anchor [B, Hq, NB], fp32."""
    batch, num_q, seq_len, head_dim = q.shape
    num_blocks = triton.cdiv(seq_len, block)
    pooled_q = torch.empty(batch, num_q, num_blocks, head_dim, dtype=torch.float32, device=q.device)
    pooled_anchor = torch.empty(batch, num_q, num_blocks, dtype=torch.float32, device=q.device)
    _anchor_pool_kernel[(num_blocks, batch * num_q)](
        q, k, pooled_q, pooled_anchor,
        *q.stride(), *k.stride(), *pooled_q.stride(), *pooled_anchor.stride(),
        num_q, num_q // k.shape[1], seq_len, block, group_rows, sink, local, scale,
        DOT_FP32=_interpreter_cannot_dot(q.dtype), PRECISION=_FP32_DOT_PRECISION, HEAD_DIM=head_dim, HEAD_DIM_PAD=triton.next_power_of_2(head_dim),
        # tl.dot needs at least 16 rows; padded rows are masked out of every sum.
        BLOCK_M=max(16, triton.next_power_of_2(block)), **FP_FUSION,
    )
    return pooled_q, pooled_anchor


def _slice_keys(seq_len: int) -> int:
    """Keys per scan program: ~1/16 of the sequence (a power of two in _SLICE_KEYS_RANGE), so a chunk of
    groups splits into up to 16 equal programs and index offsets per (segment, slice) stay few."""
    low, high = _SLICE_KEYS_RANGE
    return min(high, max(low, triton.next_power_of_2(triton.cdiv(seq_len, 16))))


def _tail_start(seq_len: int, dense_tail: int) -> int:
    """First row of the dense tail. The kernel tests (group + 1) * group_rows > tail_start, which a
    partial last group passes with no tail at all, so "no tail" is a start no group reaches."""
    return seq_len - dense_tail if dense_tail > 0 else 2**31 - 1


def anchor_identify(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    scale: float,
    theta: float | Sequence[float],
    block: int,
    group_blocks: int,
    sink: int,
    local: int,
    share_kv_heads: bool,
    dense_tail: int = 0,
    dense_above: float = 1.0,
    max_plan_bytes: int | None = None,
    defer_sizing: bool = False,
) -> StripePlan | DensePlan | PendingPlan:
    """AnchorAttention stripes for causal prefill: q [B, Hq, N, D], k [B, Hkv, N, D] -> StripePlan.

    Arguments and result are those of ``anchor_identify_reference``; q and k are read in place
    (any strides, K never expanded for GQA), on CUDA, or on the CPU under TRITON_INTERPRET=1.
    Decided after counting, before writing any key list: a plan denser than ``dense_above``
    becomes a DensePlan; one that would take more than ``max_plan_bytes`` raises
    :class:`~sparse_prefill.interfaces.PlanBudgetExceeded`.

    ``defer_sizing`` with ``max_plan_bytes``: a :class:`~sparse_prefill.plan.PendingPlan` instead, its
    key list written before the host reads the counts, into a buffer of the most the plan may hold
    (``dense_above`` or ``max_plan_bytes``, whichever is smaller: so no more memory than the budget
    allows any plan); its ``resolve()`` makes the same decisions as above.
    """
    validate_anchor_inputs(
        q, k, scale=scale, theta=theta, block=block, group_blocks=group_blocks, sink=sink, local=local,
        share_kv_heads=share_kv_heads, dense_tail=dense_tail, dense_above=dense_above,
    )
    batch, num_q, seq_len, head_dim = q.shape
    num_kv = k.shape[1]
    heads_per_plan = num_q // num_kv if share_kv_heads else 1
    _validate_kernel_inputs(q, k, block=block, group_blocks=group_blocks, share_kv_heads=share_kv_heads)
    layout = _scan_layout(num_q // num_kv // heads_per_plan, group_blocks * heads_per_plan, head_dim)
    plan = StripePlan.empty(batch, num_q // heads_per_plan, seq_len, block * group_blocks, sink, local, q.device)
    pooled_q, pooled_anchor = _pool_blocks(q, k, scale=scale, block=block, group_rows=plan.group_rows, sink=sink, local=local)

    slice_keys = _slice_keys(seq_len)
    num_slices = triton.cdiv(seq_len, slice_keys)
    grid = (triton.cdiv(plan.num_groups, layout.groups_per_chunk), num_slices, batch * num_kv)
    words_per_step = triton.cdiv(plan.group_rows, 32)  # keep-bit words per group step (see _bit_rows)
    scan_args = (
        *pooled_q.stride(), *pooled_anchor.stride(), *k.stride(),
        num_kv, plan.plan_heads, layout.plan_heads_per_kv, layout.groups_per_chunk, plan.num_groups,
        heads_per_plan, group_blocks, pooled_q.shape[2], plan.group_rows, sink, local, _tail_start(seq_len, dense_tail),
        scale, slice_keys, num_slices, words_per_step,
    )
    segments = plan.offsets.numel() - 1
    counts = torch.zeros(segments * num_slices, dtype=torch.int32, device=q.device)  # (segment, slice) order
    # Keep bits where they fit _KEEP_BITS_FRACTION (every word the expansion uses is written by the
    # count pass, so no zeroing); the bound depends on this call's q and k alone, so head chunks decide alike.
    bits_words = batch * plan.plan_heads * words_per_step * plan.num_groups * (plan.num_groups - 1) // 2
    keep_bits = 4 * bits_words <= _KEEP_BITS_FRACTION * (q.numel() * q.element_size() + 2 * k.numel() * k.element_size())
    bits = torch.empty(bits_words if keep_bits else 1, dtype=torch.int32, device=q.device)
    constexprs = dict(
        SPLIT=q.dtype != torch.float32 and not _interpreter_cannot_dot(q.dtype),
        PRECISION=_FP32_DOT_PRECISION, HEAD_DIM=head_dim, HEAD_DIM_PAD=triton.next_power_of_2(head_dim),
        SEG_PAD=layout.seg_pad, ROW_PAD=layout.row_pad, BITS=keep_bits,
    )
    thetas = head_thetas(theta, num_q, q.device)
    _stripe_scan_kernel[grid](pooled_q, pooled_anchor, thetas, k, bits, counts, counts, *scan_args, 0,  # capacity:
                              WRITE=False, **constexprs, **FP_FUSION)  # read by the write pass only
    grid_counts = counts.view(batch, plan.plan_heads, plan.num_groups, num_slices)
    per_head = grid_counts.sum(dim=(0, 2, 3), dtype=torch.int64)
    in_last_group = grid_counts[:, :, -1].sum(dtype=torch.int64).view(1)
    # Queued before the sync, so the GPU has them while the host decides; wasted only on a dense plan.
    slice_offsets = torch.zeros(segments * num_slices + 1, dtype=torch.int64, device=q.device)
    torch.cumsum(counts, dim=0, out=slice_offsets[1:])
    offsets = slice_offsets[::num_slices].contiguous()  # a segment's first slice starts where it does
    sums = torch.cat([per_head, in_last_group])
    fixed_bytes = 8 * (segments + 1) + (4 * bits_words if keep_bits else 0)  # alive with the indices

    def write_keys(indices: torch.Tensor) -> None:
        if indices.numel():
            _stripe_scan_kernel[grid](pooled_q, pooled_anchor, thetas, k, bits, slice_offsets, indices, *scan_args,
                                      indices.numel(), WRITE=True, **constexprs, **FP_FUSION)

    def dense_or_over_budget(selected: list[int], last: int) -> DensePlan | None:
        """The plan's verdict from its counts: a DensePlan, PlanBudgetExceeded raised, or None (it holds)."""
        total = sum(selected)
        if plan.density_of_counts(total, last) > dense_above:
            return DensePlan(batch, num_q, seq_len)
        if max_plan_bytes is not None and 4 * total + fixed_bytes > max_plan_bytes:
            # int32 indices per plan head plus an equal share of the offsets and keep bits
            plan_head_bytes = [4 * n + fixed_bytes // len(selected) for n in selected]
            raise PlanBudgetExceeded.for_plan_heads(plan_head_bytes, num_kv, max_plan_bytes, heads_per_plan == 1)
        return None

    if not (defer_sizing and max_plan_bytes is not None):
        *selected, last = sums.tolist()  # the one host sync
        if (dense := dense_or_over_budget(selected, last)) is not None:
            return dense
        indices = torch.empty(sum(selected), dtype=torch.int32, device=q.device)
        write_keys(indices)
        # No plan.validate() here: it costs several times the index memory and a sync; the tests validate.
        return dataclasses.replace(plan, offsets=offsets, indices=indices)

    capacity = min(plan.max_selected(dense_above), (max_plan_bytes - fixed_bytes) // 4)  # < 0: nothing fits
    total = per_head.sum()
    holds = (plan.density_of_counts(total, in_last_group[0]) <= dense_above) & (total <= capacity)
    verdict = holds.to(torch.int32).view(1)
    # Copied before the write pass is queued: resolve() then waits for the counts, not for the key list
    # and its executor, which keep the GPU busy while the host reads the counts and goes on.
    read_counts = host_copy(torch.cat([sums, verdict.long()]))
    indices = torch.empty(max(capacity, 0), dtype=torch.int32, device=q.device)
    write_keys(indices)

    def resolve() -> StripePlan | DensePlan:
        *selected, last, held = read_counts()  # the one host sync: up to the counts, not the kernels after them
        if held:
            return dataclasses.replace(plan, offsets=offsets, indices=indices[: sum(selected)])
        # Not held on the device: too dense or over the budget (capacity is below neither). Dense attention is
        # exact, so it also answers a disagreement of host and device arithmetic, which the tests rule out.
        return dense_or_over_budget(selected, last) or DensePlan(batch, num_q, seq_len)

    return PendingPlan(dataclasses.replace(plan, offsets=offsets, indices=indices), verdict, resolve)
