"""Per-layer theta for a recall target, measured on a model's own attention.

The default theta (7.7) keeps recall 0.95 on SmolLM2 but not everywhere: on a full-attention
layer of Gemma-3-270M at 32k it keeps 0.90 (docs/benchmarks/recall.md). This finds, per layer,
the smallest theta whose selection keeps ``target_recall`` of the softmax mass on captured Q/K,
and writes it as a policy. Recall never falls as theta grows (a larger theta keeps a superset of
keys, shared lists included), so a bisection finds it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch
import yaml

from sparse_prefill.evaluation.recall import attention_recall
from sparse_prefill.patterns.anchor.reference import anchor_identify_reference
from sparse_prefill.policy import Policy, load_policy

__all__ = ["LayerTheta", "smallest_theta", "calibrate_layers", "check_calibration_base", "calibrated_policy",
           "policy_file_text"]


@dataclass(frozen=True)
class LayerTheta:
    """The chosen theta of one layer and what it keeps there (``reached``: recall >= the target)."""

    layer: int
    theta: float
    recall: float
    density: float
    reached: bool


def _measure(q: torch.Tensor, k: torch.Tensor, params: dict[str, Any], theta: float) -> tuple[float, float]:
    """(recall, density) of anchor's own selection at ``theta``, never its dense fallback."""
    scale = q.shape[-1] ** -0.5
    plan = anchor_identify_reference(q, k, scale=scale, **{**params, "theta": theta, "dense_above": 1.0})
    return attention_recall(q, k, plan, scale), plan.density()


def smallest_theta(q: torch.Tensor, k: torch.Tensor, params: dict[str, Any], target_recall: float,
                   low: float = 0.0, high: float = 16.0, tolerance: float = 0.125) -> tuple[float, float, float, bool]:
    """(theta, recall, density, reached): the smallest theta in [low, high], to ``tolerance``, whose
    selection keeps ``target_recall``; ``high`` with reached False when even that falls short."""
    if not 0 < target_recall <= 1:
        raise ValueError(f"target_recall must be in (0, 1], got {target_recall}")
    if not low < high or tolerance <= 0:
        raise ValueError(f"need low < high and tolerance > 0, got low={low}, high={high}, tolerance={tolerance}")
    recall, density = _measure(q, k, params, high)
    if recall < target_recall:
        return high, recall, density, False
    best = (high, recall, density)
    recall, density = _measure(q, k, params, low)
    if recall >= target_recall:
        return low, recall, density, True
    while high - low > tolerance:
        middle = (low + high) / 2
        recall, density = _measure(q, k, params, middle)
        if recall >= target_recall:
            high, best = middle, (middle, recall, density)
        else:
            low = middle
    return (*best, True)


def calibrate_layers(qk: dict[int, tuple[torch.Tensor, torch.Tensor]], params: dict[str, Any], target_recall: float,
                     progress: Callable[[Iterable[Any]], Iterable[Any]] = iter) -> list[LayerTheta]:
    """:func:`smallest_theta` of every captured layer (``progress`` wraps the loop, e.g. tqdm)."""
    results = []
    for layer in progress(sorted(qk)):
        q, k = qk[layer]
        theta, recall, density, reached = smallest_theta(q, k, params, target_recall)
        results.append(LayerTheta(layer, theta, recall, density, reached))
    return results


def check_calibration_base(base: Policy) -> None:
    """ValueError unless ``base``'s default is anchor with no overrides: theta is anchor's parameter, and
    overrides would be overwritten. Cheap, so a caller can check before capturing any attention."""
    if base.default.pattern != "anchor" or base.overrides:
        found = f"default pattern {base.default.pattern!r}"
        if base.overrides:
            found += f" and {len(base.overrides)} overrides"
        raise ValueError(f"calibration starts from a policy whose default pattern is 'anchor' and that has no "
                         f"overrides; {base.source} has {found}")


def calibrated_policy(base: Policy, layers: list[LayerTheta], header: str) -> str:
    """YAML of ``base`` (an anchor default) with each measured layer's theta as an override.

    Layers that were not measured keep the largest theta found: the conservative choice, since
    recall only grows with theta. Overrides repeat every parameter, because an override's missing
    parameters take the pattern's defaults, not the policy default's.
    """
    check_calibration_base(base)
    if not layers:
        raise ValueError("no calibrated layers")
    params = base.default.as_dict()
    default = {"pattern": "anchor", **params, "theta": max(result.theta for result in layers)}
    overrides = [{"layers": result.layer, "pattern": "anchor", **params, "theta": result.theta} for result in layers]
    rows = [f"  layer {r.layer}: theta {r.theta:g}, recall {r.recall:.3f}, density {r.density:.3f}"
            f"{'' if r.reached else ' (target not reached at theta 16)'}" for r in layers]
    return policy_file_text({"min_length": base.min_length, "default": default, "overrides": overrides},
                            [*header.splitlines(), *rows])


def policy_file_text(policy: Mapping[str, Any], comments: Iterable[str]) -> str:
    """A calibrated policy as YAML under ``comments`` (one ``# `` line each), after checking it loads as any
    policy file would: calibration writes a file the user will load, so a mistake shows here, not there."""
    load_policy(dict(policy))
    body = yaml.safe_dump(dict(policy), sort_keys=False, default_flow_style=None, width=120)
    return "".join(f"# {line}\n" for line in comments) + body
