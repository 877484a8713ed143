"""Stripe executor kernels side by side on the GPU: same plans, same inputs, same dense SDPA.

    python benchmarks/executor_ab.py --kernel base=/tmp/old_stripe_attention.py --out ab.json
    python benchmarks/executor_ab.py --pin r128=32/8/2/128 --out ab.json
    python benchmarks/executor_ab.py --shapes 32/8/128,14/2/64 --kernel base=... --out ab.json

Each ``--kernel label=path`` is a copy of ``kernels/stripe_attention.py`` (an older commit's, or
an experiment's); each ``--pin label=BLOCK_N/warps/stages[/maxnreg]`` is the installed kernel held
to that one autotuning configuration (no tuning), for trying configurations before adding them to
the tuning space. The installed kernel runs as ``current``. Every file is loaded as its own
module, so each autotunes on its own (a copy whose shared tile code differs too imports its own copy of
``attention_tiles.py``). ``--shapes`` takes query heads / KV heads / head dim per shape (default
Llama-3.1-8B's 32/8/128). For each shape and length the default anchor plan is identified once and every
kernel executes it: time (the median of ``--rounds`` timings, the kernels interleaved in each
round), TFLOP/s per computed score over dense SDPA's, the error vs dense, the largest difference
from ``current``'s output (the same plan must give the same answer), and the seconds of each
kernel's first call at that length (its autotuning, and compiling on first use). Kernel-only
changes are judged here, not across runs on different days.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
import triton

import speed
from sparse_prefill.evaluation.synthetic import structured_qkv
from sparse_prefill.interfaces import AttentionContext
from sparse_prefill.kernels import stripe_attention as installed
from sparse_prefill.patterns.anchor import ANCHOR
from sparse_prefill.plan import StripePlan
from sparse_prefill.policy import load_policy


def load_kernel(text: str) -> tuple[str, ModuleType]:
    label, _, path = text.partition("=")
    if not label or not Path(path).is_file():
        raise argparse.ArgumentTypeError(f"--kernel takes label=path to a stripe_attention.py copy, got {text!r}")
    if label == "current":
        raise argparse.ArgumentTypeError("--kernel label 'current' is taken by the installed kernel; choose another")
    spec = importlib.util.spec_from_file_location(f"stripe_attention_{label}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError as error:  # argparse reports this one as a usage error, not a traceback
        raise argparse.ArgumentTypeError(f"--kernel {label}: {path} does not import ({error}); a copy that imports "
                                         "its own tile module needs that module's folder on PYTHONPATH") from error
    return label, module


def _pin_config(text: str) -> tuple[str, ModuleType]:
    label, _, spec = text.partition("=")
    fields = spec.split("/")
    if not label or len(fields) not in (3, 4) or not all(field.isdigit() for field in fields):
        raise argparse.ArgumentTypeError(f"--pin takes label=BLOCK_N/warps/stages[/maxnreg], got {text!r}")
    block_n, warps, stages, *maxnreg = (int(field) for field in fields)
    label, module = load_kernel(f"{label}={installed.__file__}")
    config = triton.Config({"BLOCK_N": block_n}, num_warps=warps, num_stages=stages,
                           maxnreg=maxnreg[0] if maxnreg else None)
    module._stripe_fwd.configs = [config]  # one configuration: the autotuner runs it without timing
    return label, module


def _shapes(text: str) -> list[tuple[int, int, int]]:
    shapes = []
    for item in text.split(","):
        fields = item.split("/")
        if len(fields) != 3 or not all(field.isdigit() and int(field) > 0 for field in fields):
            raise argparse.ArgumentTypeError(f"--shapes takes HQ/HKV/D[,HQ/HKV/D...], got {item!r}")
        hq, hkv, d = (int(field) for field in fields)
        if hq % hkv:
            raise argparse.ArgumentTypeError(f"--shapes: query heads {hq} must be a multiple of KV heads {hkv}")
        if d not in installed.STRIPE_HEAD_DIMS:
            raise argparse.ArgumentTypeError(f"--shapes: head dim {d} is not one the kernel takes "
                                             f"{installed.STRIPE_HEAD_DIMS}")
        shapes.append((hq, hkv, d))
    return shapes


def _rounds(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"--rounds takes an integer >= 1, got {text!r}")
    return int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel", action="append", default=[], type=load_kernel, metavar="LABEL=PATH")
    parser.add_argument("--pin", action="append", default=[], type=_pin_config, metavar="LABEL=BLOCK_N/WARPS/STAGES[/MAXNREG]")
    parser.add_argument("--lengths", default="32768,131072")
    parser.add_argument("--shapes", type=_shapes, default=[(32, 8, 128)], metavar="HQ/HKV/D[,...]")
    parser.add_argument("--synthetic", action="append", default=["strength=0.8", "heavy_fraction=0.055"])
    parser.add_argument("--rounds", type=_rounds, default=1, help="timings per kernel, interleaved; the median is kept")
    parser.add_argument("--out", required=True)
    parser.add_argument("--commit", default="unknown")
    args = parser.parse_args()
    kernels = [("current", installed), *args.kernel, *args.pin]
    labels = [label for label, _ in kernels]
    if len(set(labels)) != len(labels):
        parser.error(f"--kernel and --pin labels must differ from each other, got {labels[1:]}")
    synthetic = speed.assignments(args.synthetic)
    strength = synthetic.pop("strength")
    params = speed.anchor_params(load_policy("anchor.yaml"), {"dense_above": 1.0})  # always a stripe plan
    result = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                  commit=args.commit, strength=strength, synthetic=synthetic, params=params, rows=[])
    for (hq, hkv, d), n in ((shape, int(x)) for shape in args.shapes for x in args.lengths.split(",")):
        q, k, v = structured_qkv(n, hq, hkv, d, device="cuda", strength=strength, **synthetic)
        scale = d ** -0.5
        plan = ANCHOR.build(**params).identify(q, k, AttentionContext.for_inputs(q, k, scale))
        assert isinstance(plan, StripePlan)
        dense_out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
        t_dense = speed.bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                                      enable_gqa=True))
        density = plan.density()
        outputs, first_call_s = {}, {}
        for label, module in kernels:  # the first call at a length autotunes (and compiles, the first time)
            (outputs[label], _), first_call_s[label] = speed.timed_once(
                lambda: module.stripe_attention(q, k, v, plan, scale))
        reference = outputs["current"]  # the installed kernel
        # Rounds interleave the kernels, so a slow spell of the GPU hits all of them alike.
        times = {label: [] for label, _ in kernels}
        for _ in range(args.rounds):
            for label, module in kernels:
                times[label].append(speed.bench(lambda: module.stripe_attention(q, k, v, plan, scale)))
        for label, module in kernels:
            out = outputs[label]
            t_execute = statistics.median(times[label])
            row = dict(kernel=label, shape=f"{hq}/{hkv}/{d}", seq_len=n, density=density, dense_ms=t_dense,
                       execute_ms=t_execute, execute_ms_rounds=times[label], first_call_s=first_call_s[label],
                       # speed.py's ratio of FLOP rates; the FLOPs per score cancel.
                       executor_efficiency_vs_sdpa=density * t_dense / t_execute,
                       rel_err_vs_dense=speed.relative_error(out, dense_out),
                       max_abs_diff_vs_current=float((out.float() - reference.float()).abs().max()),
                       finite=bool(torch.isfinite(out).all()), executor_config=str(module._stripe_fwd.best_config))
            print(" ".join(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
                           for key, value in row.items() if key != "execute_ms_rounds"), flush=True)
            result["rows"].append(row)
            with open(args.out, "w") as fh:  # after every row: a run cut short keeps what it measured
                json.dump(result, fh, indent=2)
        del q, k, v, plan, dense_out, reference, outputs
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
