"""What the attention function did, for people and for `sparse-prefill eval`: calls on each path, why calls or
plans stayed dense, and the plans' densities. Knows nothing of Hugging Face: the reasons are plain strings."""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass, field

from sparse_prefill.integrations.call_times import CallTimes
from sparse_prefill.interfaces import AttentionContext
from sparse_prefill.plan import Plan
from sparse_prefill.policy import index_runs

__all__ = ["PrefillStats"]

# Why a call ran dense, where the level of its notice depends on it (see _notice_level).
_DECODE = "decode, chunked prefill or cached prefix (query shorter than keys)"
_MIN_LENGTH = "shorter than the policy's min_length"
_WINDOW = "sliding window shorter than the input"
_POLICY_DENSE = "from the policy's dense pattern"


@dataclass
class PrefillStats:
    """What the attention function did: calls on each path, why calls ran the previous
    implementation, and the plans' densities when collected.

    A layer call can make several plans (per-head policies, memory-bounded head chunks):
    ``densities`` has one entry per plan, ``plan_heads`` the query heads each covered and
    ``plan_layers`` its layer. ``fallbacks`` counts the calls that ran the previous implementation
    by reason (decode steps and cached prefixes included: that is where they belong).
    ``dense_plans`` counts, by reason, the dense attention inside sparse calls: plans an identifier
    of a sparse pattern made dense (denser than its ``dense_above``) and padded sequences shorter
    than ``min_length``; those calls count in ``sparse_calls`` too. ``head_group_calls`` counts the
    calls made apart for the head groups of a per-head policy (a layer whose groups take different
    patterns, or settings the pattern cannot take per head, identifies and launches once per group: the
    time that costs shows up nowhere else; groups differing only in per-head parameters run as one call).
    ``dense_plan_layers`` holds, per
    reason, the layers those dense plans came from (which layers a guard or ``dense_above`` kept dense
    is what a user needs to decide where to calibrate). ``times`` holds each call's start and end when the
    handle times calls (``apply(..., time_calls=True)``).
    """

    sparse_calls: int = 0
    dense_calls: int = 0
    head_group_calls: int = 0
    densities: list[float] = field(default_factory=list)
    plan_heads: list[int] = field(default_factory=list)
    plan_layers: list[int | None] = field(default_factory=list)
    fallbacks: collections.Counter[str] = field(default_factory=collections.Counter)
    dense_plans: collections.Counter[str] = field(default_factory=collections.Counter)
    dense_plan_layers: dict[str, set[int]] = field(default_factory=dict)
    times: CallTimes = field(default_factory=CallTimes)

    def mean_density(self) -> float | None:
        """Density over every query head of every sparse call (plans weighted by their heads)."""
        heads = sum(self.plan_heads)
        return sum(d * h for d, h in zip(self.densities, self.plan_heads)) / heads if heads else None

    def layer_densities(self) -> dict[int | None, float]:
        """Mean density per layer, plans weighted by their heads (layers that made no plan are absent)."""
        totals: dict[int | None, list[float]] = {}
        for density, heads, layer in zip(self.densities, self.plan_heads, self.plan_layers):
            weighted = totals.setdefault(layer, [0.0, 0.0])
            weighted[0] += density * heads
            weighted[1] += heads
        return {layer: total / heads for layer, (total, heads) in sorted(totals.items(), key=lambda kv: str(kv[0]))}

    def layer_seconds(self) -> dict[int | None, float]:
        """Seconds each layer's attention calls took (empty unless calls were timed)."""
        return self.times.layer_seconds()

    def record(self, plan: Plan, ctx: AttentionContext) -> None:
        self.densities.append(plan.density())
        self.plan_heads.append(ctx.num_q_heads)
        self.plan_layers.append(ctx.layer_idx)

    def record_dense_plan(self, reason: str, layer: int | None) -> None:
        self.dense_plans[reason] += 1
        if layer is not None:
            self.dense_plan_layers.setdefault(reason, set()).add(layer)

    def record_fallback(self, reason: str) -> None:
        self.dense_calls += 1
        self.fallbacks[reason] += 1

    def reset(self) -> None:
        self.sparse_calls, self.dense_calls, self.head_group_calls = 0, 0, 0
        self.densities, self.plan_heads, self.plan_layers = [], [], []
        self.fallbacks, self.dense_plans = collections.Counter(), collections.Counter()
        self.dense_plan_layers = {}
        self.times.reset()

    def summary(self) -> str:
        """One paragraph for people: calls per path, mean density, and why calls or plans ran dense."""
        if not self.sparse_calls and not self.dense_calls:
            return "no attention call ran yet."
        density = self.mean_density()
        density_text = ("density not collected (apply(..., collect_stats=True))" if density is None
                        else f"mean density {density:.3f}")
        parts = [f"{self.sparse_calls} attention call(s) ran sparse"
                 + (f", {density_text}" if self.sparse_calls else "")]
        if self.head_group_calls:
            parts.append(f"their head groups with different settings ran as {self.head_group_calls} calls apart "
                         f"(each identified and launched on its own)")
        if self.dense_plans:
            parts.append(f"dense attention within them: {_by_reason(self.dense_plans, 'plan(s)', self.dense_plan_layers)}")
        if self.dense_calls:
            parts.append(f"{self.dense_calls} call(s) ran the model's own attention: "
                         f"{_by_reason(self.fallbacks, 'call(s)')}")
        return "; ".join(parts) + "."


def _by_reason(counts: collections.Counter[str], noun: str, layers: dict[str, set[int]] | None = None) -> str:
    """``counts`` as "7 call(s) decode ... (dense by design), 2 call(s) shorter than ... (layers 3, 9)", most
    first (every reason reads after "N calls")."""
    layers = layers or {}
    return ", ".join(f"{count} {noun} {reason}" + (" (dense by design)" if reason == _DECODE else "")
                     + (f" (layers {_layer_list(layers[reason])})" if layers.get(reason) else "")
                     for reason, count in counts.most_common())


def _layer_list(layers: set[int]) -> str:
    """Sorted layers with runs joined: {3, 4, 5, 9} -> "3-5, 9"."""
    return ", ".join(f"{a}-{b}" if b > a else str(a) for a, b in index_runs(layers))


def _notice_level(reason: str, fallback: bool) -> int:
    """DEBUG where dense is by design (decode; the policy's dense pattern), INFO where the policy chose it (a
    dense plan always is: the pattern chose it), WARNING where the sparse path could not honour what the model
    or the caller asked for (the caller may want to change something)."""
    if reason in (_DECODE, _POLICY_DENSE):
        return logging.DEBUG
    if not fallback or reason.startswith((_MIN_LENGTH, _WINDOW)):
        return logging.INFO
    return logging.WARNING
