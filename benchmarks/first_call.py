"""What the first sparse prefill of a process costs: compiling and autotuning, per prompt length.

    python benchmarks/first_call.py --lengths 32768,131072 --label cold --out first_call.jsonl

One process, one line of JSON per length appended to ``--out``: the seconds of the first
``sparse_attention`` call at that length (identification and execution, Llama-3.1-8B attention
shape, the shipped ``anchor.yaml``), and of the call after it. Run it several times in a row to
see what carries over between processes: Triton's compiled kernels always (its disk cache), the
autotuning results only with ``TRITON_CACHE_AUTOTUNING=1``.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import triton

import speed
from sparse_prefill.dispatch import sparse_attention
from sparse_prefill.evaluation.synthetic import structured_qkv
from sparse_prefill.interfaces import AttentionContext
from sparse_prefill.patterns.anchor import ANCHOR
from sparse_prefill.policy import load_policy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="32768,131072")
    parser.add_argument("--label", required=True, help="what this process is, e.g. cold / warm / cached")
    parser.add_argument("--out", required=True, help="a JSON-lines file; each run appends to it")
    parser.add_argument("--commit", default="unknown")
    args = parser.parse_args()
    identifier = ANCHOR.build(**speed.anchor_params(load_policy("anchor.yaml"), {}))
    hq, hkv, d = 32, 8, 128
    for n in (int(x) for x in args.lengths.split(",")):
        q, k, v = structured_qkv(n, hq, hkv, d, device="cuda", strength=0.8, heavy_fraction=0.055)
        ctx = AttentionContext.for_inputs(q, k, d ** -0.5)
        call = lambda: sparse_attention(q, k, v, identifier, ctx)  # noqa: E731
        row = dict(label=args.label, seq_len=n,
                   first_call_s=speed.timed_once(call)[1], second_call_s=speed.timed_once(call)[1],
                   cache_autotuning=os.environ.get("TRITON_CACHE_AUTOTUNING", ""), gpu=torch.cuda.get_device_name(),
                   torch=torch.__version__, triton=triton.__version__, commit=args.commit)
        print(json.dumps(row), flush=True)
        with open(args.out, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        del q, k, v
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
