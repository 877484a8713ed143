"""Where anchor's time goes on the GPU: per-kernel CUDA time of one identify + execute call.

    python benchmarks/profile_anchor.py --length 131072 --strength 0.8 --heavy-fraction 0.055

speed.py gives totals; this splits them by kernel (window pooling, the count and write scans,
the stripe executor, and the small torch ops between them) with torch.profiler.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from sparse_prefill.dispatch import sparse_attention
from sparse_prefill.evaluation.synthetic import structured_qkv
from sparse_prefill.interfaces import AttentionContext
from sparse_prefill.patterns.anchor import ANCHOR
from sparse_prefill.policy import load_policy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=131072)
    parser.add_argument("--strength", type=float, default=0.8)
    parser.add_argument("--heavy-fraction", type=float, default=0.055, help="with strength 0.8: calibrated to real attention")
    parser.add_argument("--policy", default="anchor.yaml", help="a shipped policy name or a YAML path")
    parser.add_argument("--heads", default="32,8,128", help="query heads, KV heads, head dim")
    args = parser.parse_args()
    hq, hkv, d = (int(x) for x in args.heads.split(","))
    q, k, v = structured_qkv(args.length, hq, hkv, d, device="cuda", strength=args.strength,
                            heavy_fraction=args.heavy_fraction)
    identifier = ANCHOR.build(**load_policy(args.policy).default.as_dict())
    ctx = AttentionContext.for_inputs(q, k)
    run = lambda: sparse_attention(q, k, v, identifier, ctx)  # noqa: E731
    for _ in range(3):  # compile, autotune, warm the allocator
        run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    print(f"N={args.length} strength={args.strength} heavy_fraction={args.heavy_fraction} policy={args.policy}")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60))


if __name__ == "__main__":
    main()
