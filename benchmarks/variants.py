"""Anchor settings side by side on the GPU, in one process: same inputs, same dense SDPA.

    python benchmarks/variants.py --variant "per-head theta 8.5:share_kv_heads=false,theta=8.5" \\
        --variant "shared theta 7.7:share_kv_heads=true,theta=7.7" --lengths 32768,131072 --out ab.json

Each ``--variant`` is ``label:key=value,...`` over the shipped defaults; rows are speed.py's
(real-calibrated inputs unless ``--synthetic`` says otherwise), the executor's tuned config among them.
``--check`` first compares the kernels with their references (speed.py's checks) for each variant.
"""

from __future__ import annotations

import argparse
import json

import torch
import triton

import speed
from sparse_prefill.policy import load_policy


def _variant(text: str) -> tuple[str, dict]:
    label, _, settings = text.partition(":")
    return label, speed.assignments([item for item in settings.split(",") if item])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", action="append", required=True, type=_variant)
    parser.add_argument("--lengths", default="32768,131072")
    parser.add_argument("--synthetic", action="append", default=["strength=0.8", "heavy_fraction=0.055"])
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--out", required=True)
    parser.add_argument("--commit", default="unknown")
    args = parser.parse_args()
    synthetic = speed.assignments(args.synthetic)
    strength = synthetic.pop("strength")
    policy = load_policy("anchor.yaml")  # the shipped policy, by name: the script runs from any folder
    result = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                  commit=args.commit, strength=strength, synthetic=synthetic, rows=[])
    for label, overrides in args.variant:
        params = speed.anchor_params(policy, overrides)
        checks = speed.check_kernels(params) if args.check else "skipped"
        for n in (int(x) for x in args.lengths.split(",")):
            row = speed.measure(n, params, 0, 32, 8, 128, strength, synthetic)
            result["rows"].append(dict(variant=label, params=params, checks=checks, **row))
            torch.cuda.empty_cache()
            with open(args.out, "w") as fh:  # after every row: a run cut short keeps what it measured
                json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
