"""Calibrate the synthetic speed-benchmark inputs (``structured_qkv``) against real attention.

The GPU speed benchmark runs on synthetic Q/K/V because no packaged model reaches 128k tokens. To
say its inputs are "at least as hard as real attention", this measures, per ``strength`` and
``heavy_fraction``, the best any selection could do on them (the oracle densities at recall 0.95,
per row and for 128-row stripes with windows) and what the shipped anchor policy gets (recall,
density). Per heavy fraction it narrows down the strength whose stripes-with-windows oracle density
matches real SmolLM2 at 8k (0.129, ../shared/ANCHOR.md; lower strength is harder), and the one
where the policy computes as much as on real SmolLM2 (density 0.190, docs/benchmarks/recall.md).
Over all measured settings it picks the one nearest real on all three (stripe oracle, anchor
recall 0.956 and anchor density), and runs it and the calibrated strengths at other lengths.
The runs behind docs/benchmarks/calibration.md (the second: the oracles on real Q/K cached by
``benchmarks/recall.py --qk-cache``, so the reference numbers come from this code too; the first
was written before heavy fractions were a flag, with the default 0.002)::

    python benchmarks/calibrate_synthetic.py --out docs/benchmarks/calibration_synthetic.json
    python benchmarks/calibrate_synthetic.py --real-qk /tmp/smollm2_qk_8k.pt --strengths --trend-tokens \
        --out docs/benchmarks/calibration_real_smollm2_8k.json
    python benchmarks/calibrate_synthetic.py --strengths 0.8 0.85 0.9 0.92 0.95 \
        --heavy-fractions 0.002 0.01 0.02 0.04 0.055 0.08 --no-refine --trend-strengths \
        --out docs/benchmarks/calibration_heavy.json
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sparse_prefill.evaluation.recall import attention_recall, oracle_row_density, oracle_stripe_plan
from sparse_prefill.evaluation.synthetic import structured_qkv
from sparse_prefill.patterns.anchor.reference import anchor_identify_reference
from sparse_prefill.policy import load_policy

COLUMNS = ("tokens", "strength", "heavy_fraction", "row_oracle", "stripe_oracle", "stripe_oracle_recall", "anchor_recall",
           "anchor_density", "seconds")


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=8192, help="sequence length of the calibration grid")
    parser.add_argument("--strengths", type=float, nargs="*", default=[0.8, 0.85, 0.9, 0.95, 1.0, 1.1],
                        help="calibration grid (none: with --real-qk and no --trend-tokens, only the real oracles)")
    parser.add_argument("--target-density", type=float, default=0.129,
                        help="real stripes-with-windows oracle density to match (SmolLM2, 8k, ANCHOR.md)")
    parser.add_argument("--target-anchor-density", type=float, default=0.190,
                        help="the policy's density on real SmolLM2 at 8k (docs/benchmarks/recall.md), matched too")
    parser.add_argument("--target-anchor-recall", type=float, default=0.956,
                        help="the policy's recall on real SmolLM2 at 8k (docs/benchmarks/recall.md), for the best match")
    parser.add_argument("--heavy-fractions", type=float, nargs="+", default=[0.002],
                        help="structured_qkv heavy_fraction values; the grid is strengths x heavy fractions")
    parser.add_argument("--no-refine", action="store_true",
                        help="measure the grid only: no narrowing of strength to the two density targets")
    parser.add_argument("--trend-tokens", type=int, nargs="*", default=[4096, 16384],
                        help="other lengths, run for the calibrated strength and --trend-strengths")
    parser.add_argument("--trend-strengths", type=float, nargs="*", default=[0.8, 1.0],
                        help="also run at --trend-tokens, at the first heavy fraction")
    parser.add_argument("--recall", type=float, default=0.95, help="recall target of the oracles")
    parser.add_argument("--q-heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--policy", default="anchor.yaml", help="policy whose default anchor parameters are measured")
    parser.add_argument("--real-qk", type=Path, help="also run the oracles on real Q/K cached by benchmarks/recall.py")
    parser.add_argument("--out", type=Path, help="write the results as JSON")
    return parser.parse_args()


def _measure(q: torch.Tensor, k: torch.Tensor, target: float, anchor: dict[str, Any] | None) -> dict[str, float]:
    """Oracle densities (and the oracle plan's recall, a check) plus the anchor plan's recall and density."""
    scale = q.shape[-1] ** -0.5
    oracle = oracle_stripe_plan(q, k, scale, target)
    result = {"row_oracle": oracle_row_density(q, k, scale, target), "stripe_oracle": oracle.density(),
              "stripe_oracle_recall": attention_recall(q, k, oracle, scale)}
    if anchor is not None:
        plan = anchor_identify_reference(q, k, scale=scale, **anchor)
        result |= {"anchor_recall": attention_recall(q, k, plan, scale), "anchor_density": plan.density()}
    return result


def _synthetic(args: argparse.Namespace, tokens: int, strength: float, anchor: dict[str, Any],
               heavy_fraction: float) -> dict[str, Any]:
    start = time.perf_counter()
    q, k, _ = structured_qkv(tokens, args.q_heads, args.kv_heads, args.head_dim, dtype=torch.float32,
                             device="cpu", strength=strength, heavy_fraction=heavy_fraction)
    row = {"tokens": tokens, "strength": strength, "heavy_fraction": heavy_fraction,
           **_measure(q, k, args.recall, anchor)}
    row["seconds"] = time.perf_counter() - start
    print(" | ".join(_cell(row.get(name)) for name in COLUMNS), flush=True)
    return row


def _cell(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def _bracket(rows: list[dict[str, Any]], metric: str, target: float) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The two neighbouring strengths whose ``metric`` values lie on either side of ``target``."""
    points = sorted(rows, key=lambda row: row["strength"])
    for low, high in itertools.pairwise(points):
        if min(low[metric], high[metric]) <= target <= max(low[metric], high[metric]):
            return low, high
    return None


def _interpolate(low: dict[str, Any], high: dict[str, Any], metric: str, target: float) -> float:
    (s0, d0), (s1, d1) = (low["strength"], low[metric]), (high["strength"], high[metric])
    return s0 if d0 == d1 else s0 + (target - d0) * (s1 - s0) / (d1 - d0)


def calibrate(rows: list[dict[str, Any]], metric: str, target: float,
              measure: Callable[[float], dict[str, Any]]) -> float | None:
    """Strength (2 decimals) where ``metric`` equals ``target``: narrow the grid's bracket to 0.01, then interpolate.

    Densities fall steeply with strength, so a linear interpolation across a coarse grid step is
    not trusted: each step measures the interpolated strength (rounded to 0.01, appended to ``rows``).
    """
    while (bracket := _bracket(rows, metric, target)) is not None:
        low, high = bracket
        guess = _interpolate(low, high, metric, target)
        if high["strength"] - low["strength"] <= 0.01 + 1e-9:
            return round(guess, 2)
        rows.append(measure(round(min(max(guess, low["strength"] + 0.01), high["strength"] - 0.01), 2)))
    return None


def best_match(rows: list[dict[str, Any]], targets: dict[str, float]) -> tuple[dict[str, Any], float]:
    """The row nearest every target at once: smallest worst relative deviation over ``targets``' metrics."""
    def worst(row: dict[str, Any]) -> float:
        return max(abs(row[metric] / target - 1) for metric, target in targets.items())

    row = min(rows, key=worst)
    return row, worst(row)


def _real(path: Path, target: float) -> dict[str, Any]:
    """The oracles per captured layer of real Q/K, and their means (the reference numbers, from this code)."""
    stored = torch.load(path)
    layers = {layer: _measure(q, k, target, None) for layer, (q, k) in stored["qk"].items()}
    mean = {name: sum(v[name] for v in layers.values()) / len(layers) for name in ("row_oracle", "stripe_oracle")}
    print(f"real Q/K ({stored['tokens']} tokens, layers {list(layers)}): per row {mean['row_oracle']:.4f}, "
          f"stripes with windows {mean['stripe_oracle']:.4f}", flush=True)
    return {"tokens": stored["tokens"], "layers": layers, "mean": mean}


def main() -> None:
    args = _parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    anchor = load_policy(args.policy).default.as_dict()
    if "dense_above" in anchor:  # measure the stripe pattern itself, never its dense fallback
        anchor["dense_above"] = 1.0
    report: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "shape": {"q_heads": args.q_heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim, "dtype": "float32"},
        "recall_target": args.recall, "target_density": args.target_density,
        "target_anchor_density": args.target_anchor_density, "target_anchor_recall": args.target_anchor_recall,
        "anchor": anchor,
    }
    if args.real_qk is not None:
        report["real"] = _real(args.real_qk, args.recall)
    print(" | ".join(COLUMNS))
    rows, calibrated = [], []
    trend = {(strength, args.heavy_fractions[0]) for strength in args.trend_strengths}
    for heavy_fraction in args.heavy_fractions:
        measure = functools.partial(_synthetic, args, args.tokens, anchor=anchor, heavy_fraction=heavy_fraction)
        grid = [measure(strength) for strength in args.strengths]
        if not args.no_refine:
            chosen = calibrate(grid, "stripe_oracle", args.target_density, measure)
            if chosen is not None and all(row["strength"] != chosen for row in grid):
                grid.append(measure(chosen))
            matched = calibrate(grid, "anchor_density", args.target_anchor_density, measure)
            calibrated.append({"heavy_fraction": heavy_fraction, "calibrated_strength": chosen,
                               "anchor_matched_strength": matched})
            print(f"at {args.tokens} tokens, heavy fraction {heavy_fraction}: stripe oracle density "
                  f"{args.target_density} at strength {chosen}, anchor density {args.target_anchor_density} "
                  f"at strength {matched}", flush=True)
            trend |= {(chosen, heavy_fraction)} if chosen is not None else set()
        rows += grid
    targets = {"stripe_oracle": args.target_density, "anchor_density": args.target_anchor_density,
               "anchor_recall": args.target_anchor_recall}
    report["calibrated"] = calibrated
    if rows:
        best, deviation = best_match(rows, targets)
        report["best_match"] = {"strength": best["strength"], "heavy_fraction": best["heavy_fraction"],
                                "worst_relative_deviation": deviation}
        print(f"nearest real on {', '.join(targets)}: strength {best['strength']}, heavy fraction "
              f"{best['heavy_fraction']} (worst deviation {deviation:.1%})", flush=True)
        trend.add((best["strength"], best["heavy_fraction"]))
    rows += [_synthetic(args, tokens, strength, anchor, heavy_fraction)
             for tokens in args.trend_tokens for strength, heavy_fraction in sorted(trend)]
    report["rows"] = rows
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
