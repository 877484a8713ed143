"""GPU benchmark: BlockPlans on the Triton block kernel, on the stripe kernel after conversion, and dense SDPA.

    python benchmarks/block_executor.py --lengths 32768,131072 --out block_executor.json \
        --commit $(git rev-parse --short HEAD)

Llama-3.1-8B attention shape (32 query heads, 8 KV heads, head dim 128, bf16) on the
real-calibrated structured inputs of ``speed.py``. Plans per block size: random ones keeping a
fraction of each query block's earlier key blocks (always its diagonal; one list per KV head, or
per query head with ``--plan-heads q``), and the plans of block-scoring patterns (one list per
query head). For each: the block kernel's time; the alternative, ``BlockPlan.to_stripe_plan()``
(its time apart) run on the stripe kernel; dense causal SDPA; each kernel's efficiency (computed
score pairs per second over SDPA's causal pairs per second: the fraction of SDPA's TFLOP/s it
reaches per computed score); and the output error (vs SDPA for a plan that keeps every block,
vs the float32 reference on the first KV head's slice otherwise, and block vs stripe kernel).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import torch.nn.functional as F
import triton

import speed
from sparse_prefill.evaluation.synthetic import structured_qkv
from sparse_prefill.interfaces import AttentionContext
from sparse_prefill.kernels.block_attention import _block_fwd, block_attention
from sparse_prefill.kernels.reference import block_attention_reference
from sparse_prefill.kernels.stripe_attention import stripe_attention
from sparse_prefill.plan import BlockPlan
from sparse_prefill.registry import get_pattern


def random_block_plan(heads: int, seq_len: int, block: int, keep: float, seed: int, device: str) -> BlockPlan:
    """Batch 1: every query block keeps its diagonal and each earlier key block with probability ``keep``.

    Built from a [heads, nb, nb] block mask (nb = N / block: O((N / block)^2), never N^2)."""
    num_blocks = -(-seq_len // block)
    generator = torch.Generator(device=device).manual_seed(seed)
    mask = torch.rand(heads, num_blocks, num_blocks, generator=generator, device=device) < keep
    mask = (mask | torch.eye(num_blocks, dtype=torch.bool, device=device)).tril()
    offsets = torch.zeros(heads * num_blocks + 1, dtype=torch.int64, device=device)
    torch.cumsum(mask.sum(dim=-1).flatten(), dim=0, out=offsets[1:])
    indices = mask.view(-1, num_blocks).nonzero()[:, 1].to(torch.int32)  # row-major: sorted per segment
    return BlockPlan(1, heads, seq_len, block, offsets, indices)


def first_kv_head(plan: BlockPlan, num_kv: int) -> BlockPlan:
    """The plan of batch 0's first KV group (its first plan_heads / num_kv plan heads): the reference's slice."""
    heads = plan.heads // num_kv
    end = heads * plan.num_blocks
    offsets = plan.offsets[: end + 1]
    return BlockPlan(1, heads, plan.seq_len, plan.block_size, offsets, plan.indices[: int(offsets[-1])])


def check_kernels() -> list[dict]:
    """The block kernel vs its reference on small fresh inputs (block sizes, GQA layouts, dtypes)."""
    checks = []
    for n, hq, hkv, d, block, per_kv, dtype in [(1000, 8, 2, 128, 64, True, torch.bfloat16),
                                                (777, 4, 4, 64, 128, False, torch.float16),
                                                (2048, 8, 2, 96, 128, False, torch.bfloat16),
                                                (600, 4, 1, 256, 64, True, torch.bfloat16)]:
        torch.manual_seed(n)
        q, k, v = (torch.randn(1, h, n, d, device="cuda", dtype=dtype) for h in (hq, hkv, hkv))
        plan = random_block_plan(hkv if per_kv else hq, n, block, 0.3, seed=n, device="cuda")
        out = block_attention(q, k, v, plan, d**-0.5)[0]
        ref = block_attention_reference(q, k, v, plan, d**-0.5)[0]
        err = float((out.float() - ref.float()).abs().max())
        ok = bool(torch.isfinite(out).all()) and err < (2e-2 if dtype == torch.bfloat16 else 4e-3)
        checks.append(dict(n=n, hq=hq, hkv=hkv, d=d, block=block, plan_per_kv_head=per_kv, dtype=str(dtype),
                           max_abs_err=err, ok=ok))
        print(f"check n={n} hq={hq} hkv={hkv} d={d} block={block} {dtype}: max|err|={err:.2e} ok={ok}", flush=True)
    return checks


def measure(plan: BlockPlan, label: str, q, k, v, dense_out, dense_ms: float) -> dict:
    """One plan on both kernels: times, efficiency vs SDPA, errors."""
    scale = q.shape[-1] ** -0.5
    density = plan.density()
    row = dict(plan=label, block=plan.block_size, plan_heads=plan.heads, seq_len=plan.seq_len, density=density,
               dense_ms=dense_ms)
    out = block_attention(q, k, v, plan, scale)[0]
    row["block_ms"] = speed.bench(lambda: block_attention(q, k, v, plan, scale))
    row["block_config"] = str(_block_fwd.best_config)
    row["block_efficiency_vs_sdpa"] = density * dense_ms / row["block_ms"]
    row["finite"] = bool(torch.isfinite(out).all())
    if density > 1 - 1e-9:
        row["block_rel_err_vs_sdpa"] = speed.relative_error(out, dense_out)
    num_kv = k.shape[1]
    group = q.shape[1] // num_kv
    sliced = first_kv_head(plan, num_kv)
    reference = block_attention_reference(q[:, :group], k[:, :1], v[:, :1], sliced, scale)[0]
    row["block_rel_err_vs_reference_kv_head_0"] = speed.relative_error(out[:, :group], reference)
    del reference
    try:
        stripes, convert_s = speed.timed_once(plan.to_stripe_plan)
    except ValueError as refused:  # a segment without its diagonal block: no exact StripePlan
        row["stripe"] = f"not convertible: {refused}"
    else:
        row["stripe_plan_bytes"] = stripes.indices.numel() * 4 + stripes.offsets.numel() * 8
        row["convert_first_ms"] = convert_s * 1e3
        del stripes
        torch.cuda.empty_cache()
        row["convert_ms"] = speed.bench(plan.to_stripe_plan)
        stripes = plan.to_stripe_plan()
        stripe_out = stripe_attention(q, k, v, stripes, scale)[0]
        row["stripe_ms"] = speed.bench(lambda: stripe_attention(q, k, v, stripes, scale))
        row["stripe_efficiency_vs_sdpa"] = density * dense_ms / row["stripe_ms"]
        row["convert_and_stripe_ms"] = row["convert_ms"] + row["stripe_ms"]
        row["block_over_stripe"] = row["block_ms"] / row["stripe_ms"]
        row["block_rel_diff_vs_stripe"] = speed.relative_error(out, stripe_out)
        del stripes, stripe_out
    del out
    torch.cuda.empty_cache()
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="32768,131072")
    parser.add_argument("--blocks", default="64,128", help="block sizes (multiples of 16)")
    parser.add_argument("--keep", default="0.05,0.1,0.2,0.5,1.0",
                        help="random plans: fraction of earlier key blocks each query block keeps (diagonal always)")
    parser.add_argument("--pattern", action="append", default=None, metavar="NAME",
                        help="a block-scoring pattern whose plans are timed too (default: xattention, flashprefill)")
    parser.add_argument("--plan-heads", choices=("kv", "q"), default="kv",
                        help="random plans: one key-block list per KV head (GQA heads share tiles) or per query head")
    parser.add_argument("--heads", default="32,8,128", help="query heads, KV heads, head dim")
    parser.add_argument("--out", required=True)
    parser.add_argument("--commit", default="unknown")
    parser.add_argument("--no-checks", action="store_true", help="skip the kernel checks on small inputs")
    args = parser.parse_args()
    hq, hkv, d = (int(x) for x in args.heads.split(","))
    patterns = args.pattern if args.pattern is not None else ["xattention", "flashprefill"]
    for name in patterns:
        get_pattern(name)  # an unknown name fails before any GPU work, with the registry's message
    started = time.time()
    result = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                  python=platform.python_version(), commit=args.commit,
                  shape=dict(batch=1, q_heads=hq, kv_heads=hkv, head_dim=d, dtype="bfloat16"),
                  inputs="structured_qkv(strength=0.8, heavy_fraction=0.055)", random_plan_heads=args.plan_heads,
                  checks="skipped (--no-checks)" if args.no_checks else check_kernels(), rows=[])
    for n in (int(x) for x in args.lengths.split(",")):
        q, k, v = structured_qkv(n, hq, hkv, d, device="cuda", strength=0.8, heavy_fraction=0.055)
        ctx = AttentionContext.for_inputs(q, k)
        dense = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # noqa: E731
        dense_out, dense_ms = dense(), speed.bench(dense)
        for block in (int(x) for x in args.blocks.split(",")):
            plans = [(f"random keep={keep}", lambda keep=keep: random_block_plan(
                hkv if args.plan_heads == "kv" else hq, n, block, keep, seed=block, device="cuda"))
                for keep in (float(x) for x in args.keep.split(","))]
            # dense_above=1: the pattern's own plan at any density, never its dense fallback.
            plans += [(name, lambda name=name: get_pattern(name).build(block=block, dense_above=1.0)
                       .identify(q, k, ctx)) for name in patterns]
            for label, make in plans:
                row = measure(make(), label, q, k, v, dense_out, dense_ms)
                result["rows"].append(row)
                result["seconds"] = time.time() - started
                with open(args.out, "w") as fh:  # after every row: a run cut short keeps what it measured
                    json.dump(result, fh, indent=2)
        del q, k, v, dense_out
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
