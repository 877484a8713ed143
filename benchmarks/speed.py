"""GPU benchmark: dense SDPA vs the anchor pattern, checked and timed side by side in one run.

    python benchmarks/speed.py --out results.json            # 4k..128k, Llama-3.1-8B attention shape

For each length: output error vs dense, density, identification and execution time apart and
together, the executor's TFLOP/s per computed score, SDPA's TFLOP/s, and the peak extra memory.
Before timing, every kernel is checked against its PyTorch reference on small fresh inputs.
Inputs are :func:`sparse_prefill.evaluation.synthetic.structured_qkv` (documented there).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
import triton
import triton.testing
import yaml

from sparse_prefill.dispatch import select_executor, sparse_attention
from sparse_prefill.evaluation.synthetic import structured_qkv
from sparse_prefill.interfaces import AttentionContext
from sparse_prefill.patterns.anchor.kernel import anchor_identify
from sparse_prefill.kernels.reference import stripe_attention_reference
from sparse_prefill.kernels.stripe_attention import _stripe_fwd, stripe_attention
from sparse_prefill.patterns.anchor import ANCHOR
from sparse_prefill.patterns.anchor.reference import anchor_identify_reference
from sparse_prefill.policy import Policy, load_policy

KB = 1024


# Calls at least this long (dense SDPA from about 300k tokens on the Llama-8B shape) are timed as the median of
# three calls: do_bench would first spend five on its own estimate, 80 s of a 10-minute device call at 1M.
LONG_CALL_S = 2.0


def bench(fn) -> float:
    """Median milliseconds, after a warm-up that includes compilation and autotuning."""
    fn()
    _, first = timed_once(fn)
    if first >= LONG_CALL_S:
        return 1e3 * statistics.median([first] + [timed_once(fn)[1] for _ in range(2)])
    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def timed_once(fn):
    """(fn's result, wall seconds of that one call, GPU work included): first calls, which compile and tune."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    torch.cuda.synchronize()
    return result, time.perf_counter() - start


def progress(n: int, **values: float) -> None:
    """One line per finished stage: a run cut short by its time limit still shows what it measured."""
    print(f"seq_len={n} " + " ".join(f"{key}={value:.4g}" for key, value in values.items()), flush=True)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float32, one head at a time: at 1M tokens a whole float32 copy is 16 GiB."""
    diff_sq = ref_sq = 0.0
    for out_head, ref_head in zip(out.unbind(1), ref.unbind(1)):
        ref_head = ref_head.float()
        diff_sq += float((out_head.float() - ref_head).square().sum())
        ref_sq += float(ref_head.square().sum())
    return (diff_sq / ref_sq) ** 0.5


def assignments(items: list[str]) -> dict:
    """``KEY=VALUE`` strings -> {key: value}, values read as YAML (numbers, booleans)."""
    return {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in items)}


def anchor_params(policy: Policy, overrides: dict) -> dict:
    """The policy's default anchor parameters with ``overrides``, re-validated through the policy loader
    so that a bad override gets the same precise error as YAML."""
    return load_policy({"default": {**policy.default.as_dict(), "pattern": "anchor", **overrides}}).default.as_dict()


def check_kernels(params: dict) -> list[dict]:
    """Triton identifier and executor vs their references on small fresh inputs."""
    checks = []
    for n, hq, hkv, d, dtype in [(1000, 8, 2, 128, torch.bfloat16), (777, 4, 4, 64, torch.float16),
                                 (2048, 6, 2, 96, torch.bfloat16), (600, 4, 1, 256, torch.bfloat16),
                                 (100, 4, 2, 64, torch.bfloat16)]:  # one row group: a prompt under one block
        torch.manual_seed(n)
        q, k, v = (torch.randn(2, h, n, d, device="cuda", dtype=dtype) for h in (hq, hkv, hkv))
        scale = d ** -0.5
        exact = {**params, "dense_above": 1.0}  # always stripes here: this checks the kernels
        plan = anchor_identify(q, k, scale=scale, **exact)
        ref_plan = anchor_identify_reference(q, k, scale=scale, **exact)
        same = plan.indices.numel() == ref_plan.indices.numel() and bool((plan.offsets == ref_plan.offsets).all())
        out = stripe_attention(q, k, v, plan, scale)[0]
        ref = stripe_attention_reference(q, k, v, plan, scale)[0]
        err = float((out.float() - ref.float()).abs().max())
        ok = bool(torch.isfinite(out).all()) and err < (2e-2 if dtype == torch.bfloat16 else 4e-3)
        checks.append(dict(n=n, hq=hq, hkv=hkv, d=d, dtype=str(dtype), same_plan=same, max_abs_err=err, ok=ok))
        print(f"check n={n} hq={hq} hkv={hkv} d={d} {dtype}: plan identical={same} max|err|={err:.2e} ok={ok}")
    return checks


def measure(n: int, params: dict, min_length: int, hq: int, hkv: int, d: int, strength: float,
            synthetic: dict) -> dict:
    q, k, v = structured_qkv(n, hq, hkv, d, device="cuda", strength=strength, **synthetic)
    scale = d ** -0.5
    ctx = AttentionContext.for_inputs(q, k, scale)
    identifier = ANCHOR.build(**params)
    qkv_bytes = sum(t.numel() * t.element_size() for t in (q, k, v))

    dense = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    dense_out = dense()
    t_dense = bench(dense)
    progress(n, dense_ms=t_dense)

    plan = identifier.identify(q, k, ctx)  # a DensePlan when denser than the policy's dense_above
    executor = select_executor(q, plan)
    out = executor(q, k, v, plan, ctx)[0]
    err = relative_error(out, dense_out)
    density = plan.density()
    del out
    t_identify = bench(lambda: identifier.identify(q, k, ctx))
    t_execute = bench(lambda: executor(q, k, v, plan, ctx))
    progress(n, density=density, rel_err_vs_dense=err, identify_ms=t_identify, execute_ms=t_execute)
    # The tuned tile for this length's bucket: the last configuration the autotuner ran.
    executor_config = str(_stripe_fwd.best_config) if executor.name == "triton-stripe" else None
    # What a user pays: identification and execution through the dispatcher, heads chunked when
    # the plan would pass the default memory budget.
    chunks = []
    run = lambda: sparse_attention(q, k, v, identifier, ctx)[0]
    t_total = bench(run)

    plan_kind = type(plan).__name__
    plan = None  # freed before the memory measurement below
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = sparse_attention(q, k, v, identifier, ctx,
                           on_plan=lambda plan, chunk_ctx: chunks.append((chunk_ctx.num_q_heads, chunk_ctx.num_kv_heads)))[0]
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base - out.numel() * out.element_size()
    chunked_err = relative_error(out, dense_out)

    causal_pairs = n * (n + 1) / 2
    dense_flops = 4 * causal_pairs * hq * d
    sparse_flops = dense_flops * density
    uses_sparse = n >= min_length
    row = dict(
        seq_len=n, strength=strength, density=density, rel_err_vs_dense=err, chunked_rel_err_vs_dense=chunked_err,
        dense_ms=t_dense, identify_ms=t_identify, execute_ms=t_execute, anchor_ms=t_total,
        plan_kind=plan_kind, executor=executor.name, executor_config=executor_config, heads_per_call=chunks,
        policy_ms=t_total if uses_sparse else t_dense, policy_path="anchor" if uses_sparse else "dense",
        anchor_over_dense=t_total / t_dense, policy_over_dense=(t_total if uses_sparse else t_dense) / t_dense,
        dense_tflops=dense_flops / t_dense / 1e9, executor_tflops_per_computed_score=sparse_flops / t_execute / 1e9,
        executor_efficiency_vs_sdpa=(sparse_flops / t_execute) / (dense_flops / t_dense),
        peak_extra_bytes=int(extra), peak_extra_over_qkv=extra / qkv_bytes,
        finite=bool(torch.isfinite(out).all()),
    )
    print(" ".join(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}" for key, value in row.items()))
    sys.stdout.flush()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="4096,8192,16384,32768,65536,131072")
    parser.add_argument("--out", required=True)
    parser.add_argument("--commit", default="unknown")
    parser.add_argument("--policy", default="anchor.yaml", help="a shipped policy name or a YAML path")
    parser.add_argument("--strengths", default="0.8,1.0",
                        help="synthetic input strengths: 0.8 diffuse (harder than real), 1.0 sink-dominated")
    parser.add_argument("--heads", default="32,8,128", help="query heads, KV heads, head dim")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override an anchor parameter, e.g. --set theta=6")
    parser.add_argument("--no-checks", action="store_true",
                        help="skip the kernel checks (each checked shape costs its autotuning; say where they ran)")
    parser.add_argument("--synthetic", action="append", default=[], metavar="KEY=VALUE",
                        help="another structured_qkv argument, e.g. --synthetic heavy_fraction=0.01")
    args = parser.parse_args()
    policy = load_policy(args.policy)
    params = anchor_params(policy, assignments(args.set))
    hq, hkv, d = (int(x) for x in args.heads.split(","))
    synthetic = assignments(args.synthetic)
    started = time.time()
    result = dict(
        gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
        python=platform.python_version(), commit=args.commit, params=params, min_length=policy.min_length,
        shape=dict(batch=1, q_heads=hq, kv_heads=hkv, head_dim=d, dtype="bfloat16"),
        inputs=f"sparse_prefill.evaluation.synthetic.structured_qkv (defaults but strength; {synthetic or 'nothing else'})",
        synthetic=synthetic,
        timing=f"after a warm call: triton.testing.do_bench median (warmup 25 ms, rep 100 ms); calls of "
               f"{LONG_CALL_S:g} s or more: median of 3 timed calls",
        checks="skipped (--no-checks)" if args.no_checks else check_kernels(params), rows=[],
    )
    for strength in (float(x) for x in args.strengths.split(",")):
        for n in (int(x) for x in args.lengths.split(",")):
            result["rows"].append(measure(n, params, policy.min_length, hq, hkv, d, strength, synthetic))
            torch.cuda.empty_cache()
            result["seconds"] = time.time() - started
            with open(args.out, "w") as fh:  # after every row: a run cut short keeps what it measured
                json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
