"""Prefill into a static cache vs a dynamic one, unpatched and patched, in one process.

    python benchmarks/static_cache.py --out static_cache.json                        # 4 layers, 32k and 64k
    python benchmarks/static_cache.py --tiny --device cpu --lengths 256 --out t.json  # the code path, on CPU

A Llama-3.1-8B-shaped model cut to ``--layers`` decoder layers (bf16, random weights) runs one prefill
``model(ids, logits_to_keep=1)`` under ``torch.inference_mode()`` with a ``DynamicCache`` and with a
``StaticCache`` of ``length + 64`` slots (reset before each forward, inside the timing, as a reused cache
is), without and with ``sparse_prefill.apply``. The rounds interleave the four settings; each setting's
time is the median over ``--repeats`` rounds after one warm-up round. A static cache hands attention its
whole buffer; the question is whether its prefill gets the dynamic cache's speed-up, with the same logits.
The policy is anchor at theta 0 with ``dense_above`` 1.0: on random weights anchor's default theta keeps
nearly every key, so this keeps its plans sparse (their density is recorded: far below what real models
need, which is not what this measures).
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import time

import torch

import sparse_prefill
from hf_prefill import LLAMA_31_8B
from sparse_prefill.evaluation.report import environment

# The 8B's layer shape only: vocabulary, positions and RoPE stay LlamaConfig's defaults here (the record's model).
SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim")

POLICY = {"default": {"pattern": "anchor", "theta": 0.0, "dense_above": 1.0}, "min_length": 0}
TINY_POLICY = {"default": {"pattern": "anchor", "theta": 0.0, "dense_above": 1.0, "block": 64, "sink": 64,
                           "local": 64}, "min_length": 0}


def build_model(layers: int, tiny: bool, device: str, max_positions: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = (dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=32)
             if tiny else {key: LLAMA_31_8B[key] for key in SHAPE_KEYS})
    config = LlamaConfig(vocab_size=1024, num_hidden_layers=layers, max_position_embeddings=max_positions, **shape)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    return LlamaForCausalLM(config).to(device, dtype).eval()


def prefill(model, ids: torch.Tensor, cache) -> tuple[float, torch.Tensor]:
    """One timed prefill (ms) and its last position's logits; a static cache is reset first."""
    keyword = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    synchronize = torch.cuda.synchronize if ids.is_cuda else (lambda: None)
    synchronize()
    start = time.perf_counter()
    with torch.inference_mode():
        if cache is not None:
            cache.reset()
        extra = {} if cache is None else {keyword: cache}
        logits = model(ids, logits_to_keep=1, use_cache=True, **extra).logits
    synchronize()
    return (time.perf_counter() - start) * 1e3, logits.float()


def measure(model, length: int, repeats: int, policy: dict) -> list[dict]:
    from transformers import StaticCache

    ids = torch.randint(0, model.config.vocab_size, (1, length), device=model.device)
    static = StaticCache(config=model.config, max_cache_len=length + 64)
    settings = [(patched, cache) for patched in (False, True) for cache in ("dynamic", "static")]
    times: dict[tuple[bool, str], list[float]] = {setting: [] for setting in settings}
    logits: dict[tuple[bool, str], torch.Tensor] = {}
    plan_densities: list[float] = []  # the last round's plans: both caches, every layer
    for round_ in range(repeats + 1):  # round 0 compiles and tunes: not timed
        for patched in (False, True):
            handle = sparse_prefill.apply(model, policy, collect_stats=True) if patched else None
            for cache in ("dynamic", "static"):
                ms, logits[patched, cache] = prefill(model, ids, static if cache == "static" else None)
                if round_:
                    times[patched, cache].append(ms)
            if handle is not None:
                plan_densities = handle.stats.densities
                sparse_prefill.remove(model)
    rows = []
    for patched, cache in settings:
        rows.append(dict(length=length, patched=patched, cache=cache,
                         prefill_ms=statistics.median(times[patched, cache]), times_ms=times[patched, cache]))
    for patched in (False, True):
        diff = (logits[patched, "static"] - logits[patched, "dynamic"]).abs().max().item()
        rows.append(dict(length=length, patched=patched, max_abs_logit_diff_static_vs_dynamic=diff))
    rows.append(dict(length=length, plans_per_round=len(plan_densities),
                     mean_plan_density=sum(plan_densities) / max(len(plan_densities), 1)))
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 65536])
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the 8B shape")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds after one warm-up round")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a tiny Llama and anchor scaled to it (CPU path)")
    parser.add_argument("--out", required=True)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    model = build_model(args.layers, args.tiny, args.device, max(args.lengths) + 128)
    policy = TINY_POLICY if args.tiny else POLICY
    result = {**environment(torch.device(args.device)), "layers": args.layers, "policy": policy, "rows": []}
    for length in args.lengths:
        for row in measure(model, length, args.repeats, policy):
            print(json.dumps(row), flush=True)
            result["rows"].append(row)
        if args.device == "cuda":
            torch.cuda.empty_cache()
    with open(args.out, "w") as handle:
        json.dump(result, handle, indent=1)
    return result


if __name__ == "__main__":
    main()
