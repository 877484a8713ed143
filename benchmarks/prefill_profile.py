"""Where a whole-model prefill's time goes: dense and each policy, CUDA time by kernel family, and the GPU's idle gap.

    python benchmarks/prefill_profile.py --model MODEL.gguf --tokenizer TOKENIZER --length 32752 \
        --policy layers-floor0.7.yaml --policy anchor.yaml --out profile.json

For each policy (dense first): the prefill's median time (``prefill_ms``, as ``sparse-prefill eval`` times it),
then one prefill under torch.profiler, its CUDA kernel time summed by family (SDPA, the anchor identifier's pool
and scan kernels, the stripe and block executors, matrix multiplies, the rest) and the largest kernels. Wall time
minus the kernels' sum is time the GPU waited: on the host (Python, launches, a host sync that sizes a plan) or
between kernels. Which of these a sparse policy adds is what to make cheaper when its prefill does not fall with
its density (docs/benchmarks/whole_model.md, Qwen2.5-Coder-0.5B at 32k). For each policy ``grown_kernels_ms``
lists the kernels it spends more time in than dense does (its identifier and executor, and any copy or cast it
adds). On a CPU (``--device cpu``, a smoke test) only wall times are meaningful.

A stripe-kernel change judged on the whole model: each ``--kernel LABEL=PATH`` (a ``kernels/stripe_attention.py``
copy, as ``executor_ab.py`` takes it) runs in place of the installed kernel for ``--rounds`` more medians of each
policy, interleaved with the installed one (``kernel_ab_ms``), in the same process, model and input.

``--sizing-ab``: for each policy, ``--rounds`` more medians with every identifier's plans launched before their
size is read (``pending``, as shipped) and sized at the one host sync first (``sized``), interleaved
(``sizing_ab_ms``): whether pending plans pay on this model and GPU
(docs/benchmarks/pending_plans_qwen25_coder_05b_32k_h100.json).

``--dense-ab``: for each policy, ``--rounds`` more medians of dense and the policy, applied and removed in turn
(``dense_ab_ms``; the order reversed every other round): a ratio against dense that one slow spell of the GPU
cannot decide, for a policy whose ratio sits at a target.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import time

import torch
from torch.profiler import ProfilerActivity, profile

import sparse_prefill
from executor_ab import load_kernel
from sparse_prefill.evaluation.models import essay_token_ids, load_tokenizer_and_config, load_weights, locate_model
from sparse_prefill.evaluation.whole_model import prefill_ms
from sparse_prefill.interfaces import AttentionContext, Identifier
from sparse_prefill.kernels import executors
from sparse_prefill.policy import load_policy

# First match wins; names as CUDA reports kernels (cuDNN / flash SDPA, cuBLAS, our Triton kernels by function name).
FAMILIES = [("flash", "sdpa"), ("fmha", "sdpa"), ("cudnn", "sdpa"), ("_anchor_pool", "anchor identify"),
            ("_stripe_scan", "anchor identify"), ("_stripe_fwd", "stripe executor"), ("_block_fwd", "block executor"),
            ("_block_mass", "block identify"), ("gemm", "matmul"), ("nvjet", "matmul"), ("cutlass", "matmul"),
            ("sm90_xmma", "matmul")]


def family(kernel: str) -> str:
    name = kernel.lower()
    return next((fam for key, fam in FAMILIES if key in name), "other")


def profile_prefill(model, ids: torch.Tensor, repeats: int, device: torch.device) -> dict:
    median = prefill_ms(model, ids, repeats)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.inference_mode(), profile(activities=activities) as prof:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        model(ids, use_cache=False, logits_to_keep=1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall = (time.perf_counter() - start) * 1e3
    families, kernels = collections.Counter(), collections.Counter()
    for event in prof.key_averages():
        if event.device_type.name == "CUDA" and event.device_time_total:
            families[family(event.key)] += event.device_time_total / 1e3
            kernels[event.key[:100]] += event.device_time_total / 1e3
    busy = sum(families.values())
    return {"prefill_ms": median, "profiled_wall_ms": wall, "kernels_ms": busy, "gpu_idle_ms": wall - busy,
            "families_ms": dict(families.most_common()), "top_kernels_ms": dict(kernels.most_common(12)),
            "_all_kernels_ms": dict(kernels)}


def grown_kernels(policy_kernels: dict[str, float], dense_kernels: dict[str, float], count: int = 15,
                  min_ms: float = 0.05) -> dict[str, float]:
    """The kernels a policy spends more time in than dense does (new ones included), largest growth first: the
    cost a sparse policy adds beside its own identifier and executor (copies, casts, bookkeeping)."""
    growth = {name: ms - dense_kernels.get(name, 0.0) for name, ms in policy_kernels.items()}
    grown = sorted(((ms, name) for name, ms in growth.items() if ms >= min_ms), reverse=True)[:count]
    return {name: round(ms, 3) for ms, name in grown}


def _interleaved(model, ids: torch.Tensor, repeats: int, rounds: int, variants: list, install, alternate: bool
                 ) -> dict[str, list[float]]:
    """Prefill medians per (label, value) of ``variants``, each round timing every one after ``install(value)``
    (in reverse order every other round when ``alternate``), so that a slow spell of the GPU hits all of them
    alike; the first variant's value is installed again afterwards."""
    times: dict[str, list[float]] = {label: [] for label, _ in variants}
    try:
        for round_ in range(rounds):
            for label, value in variants if round_ % 2 == 0 or not alternate else variants[::-1]:
                install(value)
                times[label].append(prefill_ms(model, ids, repeats))
    finally:
        install(variants[0][1])
    return times


def time_kernels(model, ids: torch.Tensor, repeats: int, rounds: int, kernels: list) -> dict[str, list[float]]:
    """Prefill medians per stripe kernel (the installed one as ``current``), the kernels interleaved in each round."""
    variants = [("current", executors.stripe_attention)]
    variants += [(label, module.stripe_attention) for label, module in kernels]
    install = lambda kernel: setattr(executors, "stripe_attention", kernel)  # noqa: E731
    return _interleaved(model, ids, repeats, rounds, variants, install, alternate=False)


def _identifier_classes() -> list[type]:
    """Every imported Identifier class that defines its own ``identify`` (built-ins and plugins alike)."""
    found, todo = [], [Identifier]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if "identify" in vars(cls) and cls is not Identifier:
            found.append(cls)
    return found


def _sized(identify):
    """``identify`` with ``ctx.defer_sizing`` off: the plan sized at its one host sync before anything is launched."""
    def sized(self, q: torch.Tensor, k: torch.Tensor, ctx: AttentionContext):
        return identify(self, q, k, dataclasses.replace(ctx, defer_sizing=False))
    return sized


def time_sizing(model, ids: torch.Tensor, repeats: int, rounds: int) -> dict[str, list[float]]:
    """Prefill medians with plans launched before their size is read (``pending``, as shipped: anchor since
    5f5277d, the block patterns since) and sized at the sync before anything is launched (``sized``:
    ``ctx.defer_sizing`` off for every identifier, the path before), interleaved in each round (the order
    reversed every other round), same model and input."""
    shipped = {cls: vars(cls)["identify"] for cls in _identifier_classes()}
    sized = {cls: _sized(identify) for cls, identify in shipped.items()}

    def install(identifiers: dict) -> None:
        for cls, identify in identifiers.items():
            setattr(cls, "identify", identify)

    return _interleaved(model, ids, repeats, rounds, [("pending", shipped), ("sized", sized)], install,
                        alternate=True)


def time_against_dense(model, ids: torch.Tensor, repeats: int, rounds: int, policy) -> dict[str, list[float]]:
    """Prefill medians of dense (the policy removed) and of ``policy`` (applied again), interleaved in each round
    (the order reversed every other round), same model and input; the policy is applied when it returns."""
    def install(value) -> None:
        try:
            sparse_prefill.remove(model)
        except RuntimeError:  # not applied (the dense turn ran last)
            pass
        if value is not None:
            sparse_prefill.apply(model, value)

    return _interleaved(model, ids, repeats, rounds, [("policy", policy), ("dense", None)], install, alternate=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a .gguf file, a Hugging Face folder, or smollm2")
    parser.add_argument("--tokenizer", default=None, help="a tokenizer folder (default: the model's own)")
    parser.add_argument("--length", type=int, default=32752)
    parser.add_argument("--policy", action="append", default=[], help="a policy file or shipped name; repeatable")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--kernel", action="append", default=[], type=load_kernel, metavar="LABEL=PATH",
                        help="a stripe_attention.py copy timed against the installed kernel; repeatable")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved medians per kernel with --kernel, per sizing with --sizing-ab")
    parser.add_argument("--sizing-ab", action="store_true",
                        help="also time every identifier's plans sized at the sync against pending plans")
    parser.add_argument("--dense-ab", action="store_true",
                        help="also time each policy against dense, applied and removed in turn, --rounds times")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.length < 2 or args.repeats < 1 or args.rounds < 1:
        parser.error(f"--length must be >= 2 tokens, --repeats and --rounds >= 1, got {args.length}, {args.repeats} "
                     f"and {args.rounds}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device here; allowed: cpu")
    policies = {name: load_policy(name) for name in args.policy}  # bad files fail here, before the model loads
    device = torch.device(args.device)
    files = locate_model(args.model, args.tokenizer)
    tokenizer, config = load_tokenizer_and_config(files)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = load_weights(files, config, dtype, args.device, "sdpa")
    ids = essay_token_ids(tokenizer, args.length).to(device)
    record = {"model": args.model, "length": args.length, "device": str(device),
              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
              "versions": {"torch": torch.__version__}, "results": {}}
    rows = record["results"]
    for label, policy in {"dense": None, **policies}.items():
        handle = sparse_prefill.apply(model, policy) if policy is not None else None
        try:
            rows[label] = profile_prefill(model, ids, args.repeats, device)
            if args.kernel and policy is not None:
                rows[label]["kernel_ab_ms"] = time_kernels(model, ids, args.repeats, args.rounds, args.kernel)
            if args.sizing_ab and policy is not None:
                rows[label]["sizing_ab_ms"] = time_sizing(model, ids, args.repeats, args.rounds)
            if args.dense_ab and policy is not None:
                rows[label]["dense_ab_ms"] = time_against_dense(model, ids, args.repeats, args.rounds, policy)
        finally:
            if handle is not None:
                sparse_prefill.remove(model)
        row = rows[label]
        if policy is not None:
            row["grown_kernels_ms"] = grown_kernels(row["_all_kernels_ms"], rows["dense"]["_all_kernels_ms"])
        print(f"{label}: prefill {row['prefill_ms']:.1f} ms; profiled {row['profiled_wall_ms']:.1f} ms, kernels "
              f"{row['kernels_ms']:.1f} ms, GPU idle {row['gpu_idle_ms']:.1f} ms")
        for name, ms in row["families_ms"].items():
            print(f"    {name:16s} {ms:8.2f} ms")
        for name, times in row.get("kernel_ab_ms", {}).items():
            print(f"    kernel {name}: " + ", ".join(f"{ms:.1f}" for ms in times) + " ms")
        for name, times in row.get("sizing_ab_ms", {}).items():
            print(f"    plans {name}: " + ", ".join(f"{ms:.1f}" for ms in times) + " ms")
        for name, ms in row.get("grown_kernels_ms", {}).items():
            print(f"    grown {ms:+7.2f} ms  {name}")
        if "dense_ab_ms" in row:
            pairs = zip(row["dense_ab_ms"]["policy"], row["dense_ab_ms"]["dense"])
            print("    against dense: " + ", ".join(f"{p:.1f}/{d:.1f} = {p / d:.3f}x" for p, d in pairs))
        with open(args.out, "w") as f:  # after every policy: a run cut short keeps what it measured
            json.dump(_without_private(record), f, indent=1)


def _without_private(record: dict) -> dict:
    """The record as written: each row's full kernel table (keys starting with "_") stays in memory only."""
    rows = {label: {key: value for key, value in row.items() if not key.startswith("_")}
            for label, row in record["results"].items()}
    return {**record, "results": rows}


if __name__ == "__main__":
    main()
