"""A cheap test at run time that a plan's output is the attention's: the error guard.

A pattern's settings are chosen on some models and texts; on another model a head can lose what
matters (a row-specific head, or attention spread thinly over every key) and the answers change. The
guard checks each sparse call after it runs: it computes exact attention for a few query rows
(``rows`` of N, so ``rows / N`` of the dense cost; kernels/sampled_rows.py on a GPU), compares the
plan's output on those rows with it, and runs dense again every KV group whose query heads' relative
output error ``||O_plan - O|| / ||O||`` has a 90th percentile above ``max_error`` over those rows.
Groups that pass keep the plan's output, so a call that passes costs the test alone: a few
kernels and one host synchronisation (the decision), and ``O(rows * N)`` memory.

Why the output error and its 90th percentile: on Qwen2.5-Coder-0.5B at 32k (benchmarks/guard_signals.py,
docs/benchmarks/whole_model.md) it separates the five layers whose anchor plans cost the model most
(KL 0.016-0.083 each, p90 error 0.60-1.31) from the rest (KL <= 0.009, p90 error <= 0.38); attention
recall does not (a layer keeping 0.81 of the mass cost KL 0.076, another keeping 0.81 cost 0.002).

With ``remember`` > 0 a KV group the guard rejects is remembered (per layer, KV head and power-of-two
length bucket, in a :class:`GuardMemory` the caller keeps: one per patched model): its next ``remember``
calls run dense at once, without identification, plan or test, and the one after is tested again.
Acceptances are never remembered (a group that passed is tested on every call), so remembering can cost
speed, never answers: where rejections repeat from prompt to prompt, as the same layers' did on
Qwen2.5-Coder, a rejected group stops paying for a plan it will not use.

The rows are spread evenly over the last three quarters of the prompt (rows in the first quarter attend
mostly their windows, which every plan keeps); the same rows for the same length, so a decision is
reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import lru_cache
from typing import Any, Callable

import torch

from sparse_prefill.kernels.attention_tiles import DTYPES, HEAD_DIMS
from sparse_prefill.kernels.reference import sampled_rows_reference
from sparse_prefill.kernels.sampled_rows import sampled_rows_attention

__all__ = ["ErrorGuard", "GuardMemory", "guard_setting_problem"]

# The share of sampled rows (per KV group, all its query heads pooled) allowed above max_error.
_QUANTILE = 0.9


@lru_cache(maxsize=32)
def _sampled_rows(count: int, seq_len: int, device: torch.device) -> torch.Tensor:
    """int64 [R] rows on ``device``, built once per shape."""
    first = seq_len // 4
    rows = sorted({round(first + i * (seq_len - 1 - first) / max(count - 1, 1)) for i in range(count)})
    return torch.tensor(rows[: seq_len - first], dtype=torch.int64, device=device)


def _exact_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor, scale: float) -> torch.Tensor:
    """float32 exact attention of ``rows``: the Triton kernel split over the keys on a GPU (SDPA with a row mask
    runs one program per head there: 2.3-3.7x slower on an H200, benchmarks/guard_cost.py), the SDPA reference
    elsewhere."""
    if q.is_cuda and q.dtype in DTYPES and q.shape[-1] in HEAD_DIMS:
        return sampled_rows_attention(q, k, v, rows, scale)
    return sampled_rows_reference(q, k, v, rows, scale).float()


def _max_error_problem(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        return f"expected a number >= 0 (relative output error), got {value!r}"
    return None


def _rows_problem(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return f"expected an integer >= 1, got {value!r}"
    return None


def _remember_problem(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return (f"expected an integer >= 0 (calls a rejected KV group runs dense before a new test; 0: none), "
                f"got {value!r}")
    return None


_SETTINGS: dict[str, Callable[[Any], str | None]] = {"max_error": _max_error_problem, "rows": _rows_problem,
                                                     "remember": _remember_problem}


def guard_setting_problem(key: str, value: Any) -> str | None:
    """What is wrong with one guard setting (None: nothing): the one rule ErrorGuard, policy files and eval's
    sweeps check, so each can say where the bad value came from."""
    check = _SETTINGS.get(key)
    return f"unknown key; allowed: {', '.join(_SETTINGS)}" if check is None else check(value)


@dataclass(frozen=True)
class ErrorGuard:
    """Run dense the KV groups whose plan output, on sampled query rows, is further than ``max_error`` from exact.

    ``max_error`` >= 0: the largest relative output error allowed at the 90th percentile of the sampled rows
    (0 makes every lossy group dense; a large value never intervenes). ``rows``: query rows sampled per
    call (the test's cost grows with it, its noise falls). ``remember``: calls a rejected KV group then
    runs dense without identification or test (0: every call is tested; see :class:`GuardMemory`).
    """

    max_error: float = 0.5
    rows: int = 64
    remember: int = 0

    def __post_init__(self) -> None:
        for setting in fields(self):
            problem = guard_setting_problem(setting.name, getattr(self, setting.name))
            if problem is not None:
                raise ValueError(f"{setting.name}: {problem}")

    def reason(self) -> str:
        """Why the guard made heads dense, as PrefillStats and the log say it."""
        return f"output error on sampled rows above the guard's max_error {self.max_error}"

    def remembered_reason(self) -> str:
        """Why a remembered group ran dense without a test, as PrefillStats and the log say it."""
        return (f"rejected by the guard (max_error {self.max_error}) in an earlier call, dense for up to "
                f"{self.remember} calls before a new test")

    def sample_rows(self, seq_len: int, device: torch.device) -> torch.Tensor:
        """int64 [<= rows] distinct rows spread evenly over [seq_len // 4, seq_len)."""
        return _sampled_rows(self.rows, seq_len, torch.device(device))

    def kv_head_errors(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                       scale: float) -> torch.Tensor:
        """float32 [Hkv]: per KV group, the 90th percentile over batch, its query heads and the sampled rows of
        ``||out - O|| / ||O||``, with O exact attention of those rows. ``out`` is the plan's output [B, Hq, N, D]."""
        rows = _sampled_rows(self.rows, q.shape[2], q.device)
        exact = _exact_rows(q, k, v, rows, scale)
        error = (out[:, :, rows].float() - exact).norm(dim=-1) / exact.norm(dim=-1).clamp_min(1e-6)
        error = torch.nan_to_num(error, nan=0.0)  # a row with no finite output has nothing a plan could lose
        batch, num_kv = q.shape[0], k.shape[1]
        per_group = error.view(batch, num_kv, -1, rows.numel()).transpose(0, 1).reshape(num_kv, -1)
        return torch.quantile(per_group, _QUANTILE, dim=1)

    def dense_kv_heads(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                       scale: float) -> list[bool]:
        """Whether each KV group must run dense (the one host synchronisation)."""
        return (self.kv_head_errors(q, k, v, out, scale) > self.max_error).tolist()


class GuardMemory:
    """The KV groups the guard rejected, and for how many more calls each runs dense without a test.

    Keyed by (layer, global KV head, ``seq_len.bit_length()``): a prompt of another length scale is judged
    afresh. Calls without a layer index are never remembered. Not thread-safe (one per patched model).
    """

    def __init__(self, remember: int) -> None:
        problem = _remember_problem(remember)
        if problem is not None:
            raise ValueError(f"remember: {problem}")
        self.remember = remember
        self._left: dict[tuple[int, int, int], int] = {}

    def known_dense(self, layer: int | None, kv_heads: range, seq_len: int) -> list[bool]:
        """Whether each of ``kv_heads`` runs dense in this call on a remembered rejection; each True uses up one
        of its remembered calls, and a group whose calls are used up is tested again (False)."""
        if layer is None or not self._left:
            return [False] * len(kv_heads)
        known = []
        for kv in kv_heads:
            key = (layer, kv, seq_len.bit_length())
            left = self._left.pop(key, 0)  # kept only while calls remain, so len() needs no filter
            if left > 1:
                self._left[key] = left - 1
            known.append(left > 0)
        return known

    def record(self, layer: int | None, kv_heads: range, seq_len: int, rejected: list[bool]) -> None:
        """Remember the groups the guard just rejected (for ``remember`` calls); the others are left alone."""
        if layer is None or self.remember == 0:
            return
        for kv, was_rejected in zip(kv_heads, rejected):
            if was_rejected:
                self._left[(layer, kv, seq_len.bit_length())] = self.remember

    def __len__(self) -> int:
        """Groups remembered now."""
        return len(self._left)
