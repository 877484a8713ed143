"""GPU check of the identifier's two write paths: keep bits expanded, or every candidate scored again.

    python benchmarks/keep_bits_check.py out.json

Prompts whose keep bits would pass ``_KEEP_BITS_FRACTION`` of q+k+v (very long ones) take the
re-scoring path. Both must give plans identical to the PyTorch reference; the 128k identification
time of each shows what the bits save (real-calibrated inputs, shipped parameters).
"""

from __future__ import annotations

import argparse
import json

import torch
import triton
import triton.testing

import sparse_prefill.patterns.anchor.kernel as identify_module
from sparse_prefill.evaluation.synthetic import structured_qkv
from sparse_prefill.patterns.anchor.reference import anchor_identify_reference

SHAPES = [(1000, 8, 2, 128, torch.bfloat16, True), (777, 4, 4, 64, torch.float16, False)]  # n, hq, hkv, d, dtype, shared


def main(out_path: str) -> None:
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    for fraction in (0.0, 0.1):  # 0: no room for bits, the write pass scores again; 0.1: the shipped bound
        identify_module._KEEP_BITS_FRACTION = fraction
        for n, hq, hkv, d, dtype, shared in SHAPES:
            torch.manual_seed(n)
            q, k = (torch.randn(2, h, n, d, device="cuda", dtype=dtype) for h in (hq, hkv))
            params = dict(scale=d**-0.5, theta=4.0, block=128, group_blocks=1, sink=16, local=64,
                          share_kv_heads=shared, dense_tail=0)
            plan, ref = identify_module.anchor_identify(q, k, **params), anchor_identify_reference(q, k, **params)
            same = (plan.indices.numel() == ref.indices.numel() and bool((plan.offsets == ref.offsets).all())
                    and bool((plan.indices == ref.indices).all()))
            result[f"frac{fraction}-n{n}"] = same
            print(fraction, n, "identical", same, flush=True)
        q, k, _ = structured_qkv(131072, 32, 8, 128, device="cuda", strength=0.8, heavy_fraction=0.055)
        params = dict(scale=128**-0.5, theta=7.7, block=128, group_blocks=1, sink=128, local=128,
                      share_kv_heads=True, dense_tail=128)
        ms = triton.testing.do_bench(lambda: identify_module.anchor_identify(q, k, **params), warmup=25, rep=100,
                                     return_mode="median")
        result[f"frac{fraction}-identify128k_ms"] = ms
        print(fraction, "identify 128k ms", ms, flush=True)
        del q, k
    with open(out_path, "w") as fh:
        json.dump(result, fh, indent=1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="where to write the results (JSON); needs a CUDA GPU")
    main(parser.parse_args().out)
