"""Build every Triton kernel for a CUDA target (to Triton IR, no GPU needed) with the arguments its real calls pass.

The kernel tests run under ``TRITON_INTERPRET=1``, where every argument stays what Python passed. Compiled Triton
turns an integer argument equal to 1 into a plain constant instead (and an argument equal to 1 is common: one batch,
one KV head, a prompt of one row group), so a kernel that calls a tensor method on it, ``num_groups.to(...)`` say,
builds on the CPU and fails on the GPU. Two steps, each in its own process because ``TRITON_INTERPRET`` is read
when triton is imported:

    python tests/cuda_builds.py capture LAUNCHES.json   # small calls of every kernel, interpreted; records launches
    python tests/cuda_builds.py build LAUNCHES.json     # each launch built for sm_90, then again with each int = 1

``build`` prints one line per failure and exits 1 if any; tests/test_cuda_builds.py runs both.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any

POINTER_TYPES = {"torch.bfloat16": "*bf16", "torch.float16": "*fp16", "torch.float32": "*fp32",
                 "torch.int32": "*i32", "torch.int64": "*i64", "torch.uint8": "*u8", "torch.int8": "*i8",
                 "torch.bool": "*i1"}


def _describe(value: Any) -> list:
    import torch

    if isinstance(value, torch.Tensor):
        return ["pointer", str(value.dtype)]
    if isinstance(value, bool):
        return ["bool", value]
    if isinstance(value, int):
        return ["int", value]
    if isinstance(value, float):
        return ["float", value]
    return ["constant", value if value is None or isinstance(value, str) else repr(value)]


def capture(path: str) -> None:
    """Small calls of each kernel under the interpreter; every launch's arguments described, written to ``path``."""
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    import triton.runtime.interpreter as interpreter

    from sparse_prefill.kernels.block_attention import block_attention
    from sparse_prefill.kernels.sampled_rows import sampled_rows_attention
    from sparse_prefill.kernels.stripe_attention import stripe_attention
    from sparse_prefill.patterns.anchor.kernel import anchor_identify
    from plan_factories import random_block_plan  # tests/ is this script's folder, so on its path
    from sparse_prefill.patterns._blocks import block_means
    from sparse_prefill.patterns.block_mass import antidiagonal_block_mass, pooled_block_scores
    from sparse_prefill.patterns.top_blocks import top_block_lists

    launches: list[dict] = []
    run = interpreter.InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        launches.append({"module": self.fn.__module__, "name": self.fn.__name__,
                         "args": [_describe(a) for a in args], "kwargs": {k: _describe(v) for k, v in kwargs.items()}})
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    interpreter.InterpretedFunction.run = recording_run
    gen = torch.Generator().manual_seed(0)
    # (batch, q heads, kv heads, tokens): one of everything, then several; 40 tokens is one anchor row group of 64
    # (1, 6, 2): 3 heads per KV head, a count that does not divide a power-of-two tile (slots cut across rows)
    for batch, num_q, num_kv, seq_len, dtypes in [(1, 1, 1, 40, (torch.bfloat16, torch.float32)),
                                                  (2, 4, 2, 200, (torch.bfloat16,)), (1, 6, 2, 96, (torch.bfloat16,))]:
        for dtype in dtypes:  # bf16 and fp32 take different constexpr paths (split dots, precision)
            q, k, v = (torch.randn(batch, h, seq_len, 64, generator=gen).to(dtype) for h in (num_q, num_kv, num_kv))
            for share in (True, False):
                plan = anchor_identify(q, k, scale=0.125, theta=4.0, block=32, group_blocks=2, sink=8, local=16,
                                       share_kv_heads=share)
                stripe_attention(q, k, v, plan, 0.125)
            block_attention(q, k, v, random_block_plan(batch, num_q, seq_len, 32, fraction=1.0), 0.125)
            antidiagonal_block_mass(q, k, 0.125, 32, 8)
            pooled_block_scores(q, block_means(k, 32).to(dtype), 0.125, 32)
            top_block_lists(torch.randn(batch, num_q, -(-seq_len // 32), -(-seq_len // 32), generator=gen), 2)
            sampled_rows_attention(q, k, v, torch.tensor([0, seq_len - 1]), 0.125)
    Path(path).write_text(json.dumps(launches))


def _kernel(module: str, name: str):
    from triton.runtime.jit import JITFunction

    obj = getattr(importlib.import_module(module), name)
    while not isinstance(obj, JITFunction):  # autotune and heuristics wrap the JIT function
        obj = obj.fn
    return obj


def _signature(fn, launch: dict, ones: set[str]) -> tuple[dict, dict]:
    """The signature and constants the CUDA launcher would pass (integers equal to 1 as constants), plus ``ones``."""
    values = dict(zip(fn.arg_names, launch["args"]))
    values.update({k: v for k, v in launch["kwargs"].items() if k in fn.arg_names})
    signature, constants = {}, {}
    for index, name in enumerate(fn.arg_names):
        param = fn.params[index]
        kind, value = values.get(name, ["constant", param.default])
        if param.is_constexpr or kind == "constant":
            signature[name], constants[name] = "constexpr", value
        elif kind == "pointer":
            signature[name] = POINTER_TYPES[value]
        elif kind == "int" and (value == 1 or name in ones):
            signature[name], constants[name] = "constexpr", 1
        elif kind == "int":
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
        elif kind == "bool":
            signature[name] = "i1"
        else:
            signature[name] = "fp32"
    return signature, constants


def build(path: str) -> int:
    """Build each recorded launch for sm_90 as recorded, then with each integer argument in turn equal to 1."""
    os.environ.pop("TRITON_INTERPRET", None)
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    options = backend.parse_options({})
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    codegen, modules = backend.get_codegen_implementation(options), backend.get_module_map()
    failures, built, seen = [], 0, set()
    for launch in json.loads(Path(path).read_text()):
        fn = _kernel(launch["module"], launch["name"])
        ints = [name for name, arg in zip(fn.arg_names, launch["args"]) if arg[0] == "int"]
        for one in [None, *ints]:
            signature, constants = _signature(fn, launch, {one} if one else set())
            key = (launch["name"], json.dumps(signature, sort_keys=True), json.dumps(constants, sort_keys=True))
            if key in seen:
                continue
            seen.add(key)
            try:
                ASTSource(fn, signature, constants).make_ir(target, options, codegen, modules, context)
                built += 1
            except Exception as error:  # noqa: BLE001 - every failure is reported, with the kernel and the argument
                while error.__cause__ is not None:  # the innermost error names the failing expression
                    error = error.__cause__
                where = f"{one} = 1" if one else "the recorded arguments"
                failures.append(f"{launch['name']} with {where}: {' | '.join(str(error).strip().splitlines()[-4:])}")
    print(f"built {built} variants of {len({k[0] for k in seen})} kernels")
    for failure in failures:
        print(failure)
    return 1 if failures else 0


if __name__ == "__main__":
    step, file = sys.argv[1:3]
    if step == "capture":
        capture(file)
    else:
        sys.exit(build(file))
