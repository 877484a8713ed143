"""GPU check: how many compiled variants each Triton kernel holds as prompt lengths change.

    python benchmarks/compile_check.py --out compile_check.json

Runs identification and execution (the default anchor parameters, always a stripe plan) at
several lengths and records, after each, how many binaries each kernel's JIT function holds (all
autotuning configurations together). Lengths are runtime arguments, but Triton specialises every
integer argument on "equals 1" and "divisible by 16", and some arguments derive from the length
(the number of query groups, for one); a length whose arguments fall in a class not seen before
compiles once more, and a new power of two of the length (the executor's tuning bucket) compiles
every configuration in that class. The counts must stop growing once the classes are covered:
they grow with the classes, never with each new length.
"""

from __future__ import annotations

import argparse
import json

import torch
import triton

import speed
from sparse_prefill.evaluation.synthetic import structured_qkv
from sparse_prefill.interfaces import AttentionContext
from sparse_prefill.patterns.anchor.kernel import _anchor_pool_kernel, _stripe_scan_kernel
from sparse_prefill.kernels.stripe_attention import _stripe_fwd, stripe_attention
from sparse_prefill.patterns.anchor import ANCHOR
from sparse_prefill.policy import load_policy

KERNELS = {"anchor_pool": _anchor_pool_kernel, "stripe_scan": _stripe_scan_kernel, "stripe_fwd": _stripe_fwd}


def compiled_variants(autotuned) -> int:
    """Binaries the autotuned kernel's JIT function holds on the current device (all configs)."""
    caches = autotuned.fn.device_caches
    return sum(len(entry[0]) for entry in caches.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="16384,20000,24576,40000")
    parser.add_argument("--out", required=True)
    parser.add_argument("--commit", default="unknown")
    args = parser.parse_args()
    params = speed.anchor_params(load_policy("anchor.yaml"), {"dense_above": 1.0})
    identifier = ANCHOR.build(**params)
    result = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                  commit=args.commit, rows=[])
    for n in (int(x) for x in args.lengths.split(",")):
        q, k, v = structured_qkv(n, 32, 8, 128, device="cuda", strength=0.8, heavy_fraction=0.055)
        plan = identifier.identify(q, k, AttentionContext.for_inputs(q, k, 128 ** -0.5))
        out = stripe_attention(q, k, v, plan, 128 ** -0.5)[0]
        torch.cuda.synchronize()
        row = dict(seq_len=n, query_groups=plan.num_groups, length_bucket=triton.next_power_of_2(n),
                   finite=bool(torch.isfinite(out).all()),
                   compiled={name: compiled_variants(kernel) for name, kernel in KERNELS.items()})
        print(row, flush=True)
        result["rows"].append(row)
        with open(args.out, "w") as fh:  # after every row: a run cut short keeps what it measured
            json.dump(result, fh, indent=2)
        del q, k, v, plan, out
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
