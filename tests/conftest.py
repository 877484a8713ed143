"""Shared test set-up: Triton kernels run on the CPU through the interpreter.

With ``TRITON_INTERPRET=0`` (on a GPU) the kernels are compiled, and every parametrisation compiles
each configuration its autotuner times: 30-90 s per test case over the whole tuning space, more than
a GPU session can give a kernel file. There the tests tune over the 4-warp configurations only (the
fewest pipeline stages each offers), every key tile still, so each tile's code path is compiled and
checked; ``SPARSE_PREFILL_TEST_TUNING=full`` tunes over the whole space, as a user's process does.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _narrow_tuning() -> None:
    """Keep the autotuned kernels' 4-warp configurations with the fewest stages (compiled runs only)."""
    from sparse_prefill.kernels.runtime import triton_interpreted

    tuning = os.environ.get("SPARSE_PREFILL_TEST_TUNING", "")
    if tuning not in ("", "full"):
        raise ValueError(f"SPARSE_PREFILL_TEST_TUNING must be unset, empty or 'full', got {tuning!r}")
    if triton_interpreted() or tuning == "full":
        return
    from sparse_prefill.kernels import block_attention, stripe_attention
    from sparse_prefill.patterns.anchor import kernel as anchor_kernel

    tuners = (block_attention._block_fwd, stripe_attention._stripe_fwd, anchor_kernel._anchor_pool_kernel,
              anchor_kernel._stripe_scan_kernel)
    for tuner in tuners:
        four_warps = [config for config in tuner.configs if config.num_warps == 4]
        fewest = min(config.num_stages for config in four_warps)
        tuner.configs = [config for config in four_warps if config.num_stages == fewest]


_narrow_tuning()
