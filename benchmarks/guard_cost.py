"""What the error guard costs per attention call on the GPU, and where that time goes.

    python benchmarks/guard_cost.py --out OUT.json

For each shape (default: a Qwen2.5-Coder-0.5B layer at 32k, a 1.5B layer at 32k, a Llama-3.1-8B layer at
128k; calibrated synthetic inputs): dense SDPA, anchor.yaml's pattern unguarded, and guarded with a
max_error no group reaches (the test's cost alone); then the guard's pieces apart (exact rows by SDPA
with the rows' mask and by kernels/sampled_rows.py, error and quantile, the decision's host sync), and the same calls chained as a model's layers are (no
synchronisation between them), where a host sync also exposes the launches behind it.
"""

from __future__ import annotations

import argparse
import json
import platform

import torch
from torch.profiler import ProfilerActivity, profile

from sparse_prefill.dispatch import sparse_attention
from sparse_prefill.evaluation.synthetic import structured_qkv
from sparse_prefill.guard import ErrorGuard
from sparse_prefill.interfaces import AttentionContext
from sparse_prefill.kernels.sampled_rows import sampled_rows_attention
from sparse_prefill.patterns.anchor import ANCHOR
from sparse_prefill.plan import causal_rows_mask
from sparse_prefill.policy import load_policy

SHAPES = {"qwen-0.5b-32k": (32768, 14, 2, 64), "qwen-1.5b-32k": (32768, 12, 2, 128),
          "llama-8b-128k": (131072, 32, 8, 128)}


def cuda_ms(run, repeats: int) -> float:
    """Median ms of ``run`` between CUDA events, each call synchronised."""
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        run()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop))
    return sorted(times)[len(times) // 2]


def chained_ms(run, layers: int, repeats: int) -> float:
    """Median ms per call of ``layers`` calls issued back to back (a model's forward)."""
    return cuda_ms(lambda: [run() for _ in range(layers)], repeats) / layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated of {', '.join(SHAPES)}")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--layers", type=int, default=24, help="calls per chained forward")
    parser.add_argument("--out", required=True)
    parser.add_argument("--commit", default="")
    args = parser.parse_args()
    identifier = ANCHOR.build(**load_policy("anchor.yaml").default.as_dict())
    never = ErrorGuard(max_error=1e9)
    results = []
    for name in args.shapes.split(","):
        n, hq, hkv, d = SHAPES[name]
        q, k, v = structured_qkv(n, hq, hkv, d, device="cuda", strength=0.8, heavy_fraction=0.055)
        ctx = AttentionContext.for_inputs(q, k)
        scale = ctx.scale
        dense = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # noqa: E731
        unguarded = lambda: sparse_attention(q, k, v, identifier, ctx)  # noqa: E731
        guarded = lambda: sparse_attention(q, k, v, identifier, ctx, guard=never)  # noqa: E731
        out = unguarded()[0]
        for run in (dense, unguarded, guarded):
            run()
        plan = identifier.identify(q, k, ctx)
        rows = never.sample_rows(n, q.device)
        causal = causal_rows_mask(rows, n)
        pieces = {
            "exact rows (SDPA with the rows' mask)": lambda: torch.nn.functional.scaled_dot_product_attention(
                q[:, :, rows], k, v, attn_mask=causal, scale=scale, enable_gqa=True),
            "exact rows (Triton, split over keys)": lambda: sampled_rows_attention(q, k, v, rows, scale),
            "errors (exact rows + quantile)": lambda: never.kv_head_errors(q, k, v, out, scale),
            "decision (errors + host sync)": lambda: never.dense_kv_heads(q, k, v, out, scale),
        }
        row = {"shape": name, "N": n, "heads": [hq, hkv, d], "plan": type(plan).__name__,
               "plan density": plan.density(),
               "error per KV group (90th percentile)": never.kv_head_errors(q, k, v, out, scale).tolist(),
               "ms": {"dense SDPA": cuda_ms(dense, args.repeats), "anchor": cuda_ms(unguarded, args.repeats),
                      "anchor + guard": cuda_ms(guarded, args.repeats),
                      **{key: cuda_ms(run, args.repeats) for key, run in pieces.items()}},
               "chained ms per call": {key: chained_ms(run, args.layers, max(args.repeats // 2, 2))
                                       for key, run in (("dense SDPA", dense), ("anchor", unguarded),
                                                        ("anchor + guard", guarded))}}
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            guarded()
            torch.cuda.synchronize()
        row["guarded call kernels"] = prof.key_averages().table(sort_by="cuda_time_total", row_limit=14,
                                                                max_name_column_width=50)
        print(json.dumps({key: value for key, value in row.items() if key != "guarded call kernels"}), flush=True)
        print(row["guarded call kernels"], flush=True)
        results.append(row)
        del q, k, v, out, plan
        torch.cuda.empty_cache()
    record = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version(),
              "commit": args.commit, "results": results}
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
