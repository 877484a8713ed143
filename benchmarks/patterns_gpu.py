"""Registered patterns on the GPU beside dense SDPA: output error, density and time, one setting each.

    python benchmarks/patterns_gpu.py --pattern anchor --pattern vertical-slash \
        --pattern "flexprefill gamma=0.95" --lengths 32768,131072 --out patterns_gpu.json

Llama-3.1-8B attention shape (32 query heads, 8 KV heads, head dim 128, bf16) on the
real-calibrated structured inputs of ``speed.py``. For each pattern and length: the plan's kind
and density, identification alone, the whole call (``sparse_attention``: identification, the
executor the dispatcher picks, its dense fallback), and ||O - O_SDPA|| / ||O_SDPA||. Unlike
``speed.py`` it takes any registered pattern, and it times what a user of that pattern pays;
``speed.py`` stays the reference for `anchor`'s kernels.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
import triton

import speed
from sparse_prefill.dispatch import sparse_attention
from sparse_prefill.evaluation.synthetic import structured_qkv
from sparse_prefill.interfaces import AttentionContext
from sparse_prefill.registry import get_pattern


def _pattern(text: str) -> tuple[str, dict]:
    """'name key=value ...' -> (name, parameters), values read as YAML scalars."""
    name, *assignments = text.split()
    get_pattern(name)  # an unknown name gets the registry's message
    return name, speed.assignments(assignments)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pattern", action="append", required=True, type=_pattern, metavar="'NAME KEY=VALUE ...'")
    parser.add_argument("--lengths", default="32768,131072")
    parser.add_argument("--out", required=True)
    parser.add_argument("--commit", default="unknown")
    args = parser.parse_args()
    hq, hkv, d = 32, 8, 128
    result = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                  commit=args.commit, inputs="structured_qkv(strength=0.8, heavy_fraction=0.055)", rows=[])
    for n in (int(x) for x in args.lengths.split(",")):
        q, k, v = structured_qkv(n, hq, hkv, d, device="cuda", strength=0.8, heavy_fraction=0.055)
        ctx = AttentionContext.for_inputs(q, k)
        dense = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # noqa: E731
        dense_out, dense_ms = dense(), speed.bench(dense)
        for name, params in args.pattern:
            identifier = get_pattern(name).build(**params)
            plan, first_identify_s = speed.timed_once(lambda: identifier.identify(q, k, ctx))
            out, _ = sparse_attention(q, k, v, identifier, ctx)
            row = dict(pattern=name, params=params, seq_len=n, plan=type(plan).__name__,
                       density=plan.density(),
                       rel_err_vs_dense=speed.relative_error(out, dense_out), finite=bool(torch.isfinite(out).all()),
                       first_identify_s=first_identify_s, dense_ms=dense_ms,
                       identify_ms=speed.bench(lambda: identifier.identify(q, k, ctx)),
                       call_ms=speed.bench(lambda: sparse_attention(q, k, v, identifier, ctx)))
            row["call_over_dense"] = row["call_ms"] / dense_ms
            print(json.dumps(row), flush=True)
            result["rows"].append(row)
            with open(args.out, "w") as fh:  # after every row: a run cut short keeps what it measured
                json.dump(result, fh, indent=2)
            del plan, out
            torch.cuda.empty_cache()
        del q, k, v, dense_out


if __name__ == "__main__":
    main()
