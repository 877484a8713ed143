"""Every Triton kernel launch asks for floating-point fusion (kernels/runtime.py's FP_FUSION): the kernels were
checked and timed with it, and Triton 3.10's default turns it off. Launches are recorded under the interpreter."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels run on the CPU

import importlib
import pkgutil

import pytest
import torch
from triton.runtime.autotuner import Autotuner
from triton.runtime.interpreter import InterpretedFunction

from kernel_checks import needs_kernel
from sparse_prefill import kernels, patterns
from sparse_prefill.interfaces import AttentionContext
from sparse_prefill.kernels.block_attention import block_attention
from sparse_prefill.kernels.sampled_rows import sampled_rows_attention
from sparse_prefill.kernels.stripe_attention import stripe_attention
from sparse_prefill.patterns._blocks import block_means
from sparse_prefill.patterns.block_mass import antidiagonal_block_mass, pooled_block_scores
from sparse_prefill.patterns.top_blocks import top_block_lists
from sparse_prefill.registry import get_pattern

# The kernels the calls below launch (a new kernel belongs here: the first test says when one is missing).
KERNELS = {"_block_fwd", "_stripe_fwd", "_partial_kernel", "_head_maximum_kernel", "_scaled_copy_kernel",
           "_anchor_pool_kernel", "_stripe_scan_kernel", "_top_blocks_kernel", "_block_mass_kernel"}


def _package_kernels() -> set[str]:
    """Module-level Triton functions named as kernels (``*_kernel``, ``*_fwd``; jitted helpers are named for what
    they compute) in the packages that hold kernels: kernels/ and patterns/."""
    names = set()
    for package in (kernels, patterns):
        modules = [package.__name__] + [info.name for info in
                                        pkgutil.walk_packages(package.__path__, package.__name__ + ".")]
        for module in modules:
            for name, value in vars(importlib.import_module(module)).items():
                if isinstance(value, (InterpretedFunction, Autotuner)) and name.endswith(("_kernel", "_fwd")):
                    names.add(name)
    return names


@needs_kernel
def test_the_launch_test_covers_every_kernel_of_the_package() -> None:
    assert _package_kernels() == KERNELS


@needs_kernel
def test_every_kernel_launch_asks_for_fp_fusion(monkeypatch: pytest.MonkeyPatch) -> None:
    launches: dict[str, set] = {}
    run = InterpretedFunction.run

    def recording_run(self, *args, **kwargs):
        launches.setdefault(self.fn.__name__, set()).add(kwargs.get("enable_fp_fusion"))
        return run(self, *args, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", recording_run)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, 256, 64, generator=generator) for heads in (4, 2, 2))
    ctx = AttentionContext.for_inputs(q, k)
    block_plan = get_pattern("xattention").build(threshold=0.5, block=64, stride=4, dense_above=1.0).identify(q, k, ctx)
    block_attention(q, k, v, block_plan, ctx.scale)
    stripe_plan = get_pattern("anchor").build(block=64, dense_above=1.0).identify(q, k, ctx)  # its two kernels
    stripe_attention(q, k, v, stripe_plan, ctx.scale)
    sampled_rows_attention(q, k, v, torch.tensor([100, 200, 255]), ctx.scale)
    # The block patterns' scoring kernels run on CUDA only in their identifiers; called here directly.
    antidiagonal_block_mass(q, k, ctx.scale, 64, 4, float8=True)  # and the float8 rounding kernels
    top_block_lists(pooled_block_scores(q, block_means(k, 64), ctx.scale, 64), 2)
    assert set(launches) == KERNELS, sorted(launches)
    assert all(asked == {True} for asked in launches.values()), launches
