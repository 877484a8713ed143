"""Plans launched before their size is read (pending) against plans sized at the host sync, pattern by pattern.

    python benchmarks/sizing_ab.py --pattern "block-topk blocks=50" --pattern "xattention threshold=0.9" \
        --lengths 32768,131072 --rounds 3 --out sizing_ab.json

One attention call per pattern and length on the real-calibrated structured inputs of ``speed.py`` (Llama-3.1-8B's
attention shape by default), timed as a model runs it: ``--layers`` calls queued back to back, median ms per call
of ``--repeats``, the two ways interleaved for ``--rounds`` rounds (order reversed every other round), beside dense
SDPA in the same process. ``sized`` runs the same identifier with ``ctx.defer_sizing`` off (the path before). Both
ways must give the same plan kind and the same output, bit for bit (``same_output``): the verdict only decides
whether the executor runs, never what it computes. A GPU benchmark: on a CPU only the checks mean anything.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform

import torch
import torch.nn.functional as F

from executor_ab import _shapes
from guard_cost import chained_ms
from patterns_gpu import _pattern
from sparse_prefill.dispatch import sparse_attention
from sparse_prefill.evaluation.synthetic import structured_qkv
from sparse_prefill.interfaces import AttentionContext, Identifier
from sparse_prefill.registry import get_pattern


class SizedAtTheSync(Identifier):
    """``inner`` with ``ctx.defer_sizing`` off: its plan sized at the one host sync before anything is launched."""

    def __init__(self, inner: Identifier) -> None:
        self.inner = inner

    def identify(self, q: torch.Tensor, k: torch.Tensor, ctx: AttentionContext):
        return self.inner.identify(q, k, dataclasses.replace(ctx, defer_sizing=False))


def _call(q, k, v, identifier: Identifier) -> tuple[torch.Tensor, list[str]]:
    kinds: list[str] = []
    out, _ = sparse_attention(q, k, v, identifier, on_plan=lambda plan, ctx: kinds.append(type(plan).__name__))
    return out, kinds


def measure(q, k, v, name: str, params: dict, args) -> dict:
    pending = get_pattern(name).build(**params)
    ways = {"pending": pending, "sized": SizedAtTheSync(pending)}
    outputs = {label: _call(q, k, v, identifier) for label, identifier in ways.items()}
    (out_p, kinds_p), (out_s, kinds_s) = outputs["pending"], outputs["sized"]
    row = {"pattern": name, "params": params, "plan_kinds": kinds_p, "same_plan_kinds": kinds_p == kinds_s,
           "same_output": bool(torch.equal(out_p, out_s)), "finite": bool(torch.isfinite(out_p).all())}
    del outputs, out_p, out_s
    if q.device.type != "cuda":
        return row
    times: dict[str, list[float]] = {label: [] for label in ways}
    for round_ in range(args.rounds):
        order = list(ways.items()) if round_ % 2 == 0 else list(ways.items())[::-1]
        for label, identifier in order:
            times[label].append(chained_ms(lambda: sparse_attention(q, k, v, identifier), args.layers, args.repeats))
    row["call_ms"] = times
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pattern", action="append", type=_pattern, required=True, metavar="'NAME KEY=VALUE ...'")
    parser.add_argument("--lengths", default="32768,131072")
    parser.add_argument("--shape", default="32/8/128", type=_shapes, help="query heads / KV heads / head dim")
    parser.add_argument("--layers", type=int, default=8, help="calls queued back to back per timing")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--commit", default=None)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    lengths = args.lengths.split(",")
    if not all(x.isdigit() and int(x) >= 2 for x in lengths) or min(args.layers, args.repeats, args.rounds) < 1:
        parser.error(f"--lengths takes integers >= 2, comma-separated, --layers, --repeats and --rounds integers >= 1; "
                     f"got {args.lengths!r}, {args.layers}, {args.repeats}, {args.rounds}")
    if len(args.shape) != 1:
        parser.error(f"--shape takes one HQ/HKV/D, got {len(args.shape)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device here; allowed: cpu")
    (hq, hkv, d), = args.shape
    device = torch.device(args.device)
    record = {"gpu": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "commit": args.commit, "shape": f"{hq}/{hkv}/{d}", "layers": args.layers,
              "repeats": args.repeats, "rounds": args.rounds,
              "inputs": "structured_qkv(N, strength=0.8, heavy_fraction=0.055, seed=0), bfloat16", "rows": []}
    for n in map(int, lengths):
        q, k, v = structured_qkv(n, hq, hkv, d, device=device, strength=0.8, heavy_fraction=0.055, seed=0)
        dense_ms = None
        if device.type == "cuda":
            dense_ms = chained_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                                  args.layers, args.repeats)
        for name, params in args.pattern:
            row = {"seq_len": n, "dense_ms": dense_ms, **measure(q, k, v, name, params, args)}
            record["rows"].append(row)
            print(json.dumps(row), flush=True)
            with open(args.out, "w") as f:
                json.dump(record, f, indent=1)
        del q, k, v


if __name__ == "__main__":
    main()
