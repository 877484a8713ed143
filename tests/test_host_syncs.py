"""`vertical-slash` and `flexprefill` identify with one host sync per call (issue 14), counted by CUDA's
sync debug mode, and `host_copy` (anchor's pending plans) waits for its copy alone. Needs a GPU (skipped on
the CPU, where nothing counts syncs, but for host_copy's CPU path): `python -m pytest tests/test_host_syncs.py` there.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from sparse_prefill.interfaces import AttentionContext
from sparse_prefill.kernels.runtime import host_copy
from sparse_prefill.registry import get_pattern

VECTORISED = {  # small settings whose plans stay sparse at 1024 tokens
    "vertical-slash": {"vertical": 64, "slash": 64, "last_q": 32, "block": 64, "sink": 16, "local": 32},
    "vertical-slash shared": {"vertical": 64, "slash": 64, "block": 64, "share_kv_heads": True},
    "flexprefill": {"block": 64, "min_budget": 128},
}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="counts CUDA host syncs: needs a GPU")
@pytest.mark.parametrize("dense_above", [1.0, 1e-6], ids=["sparse-plan", "dense-fallback"])
@pytest.mark.parametrize("case", VECTORISED)
def test_identification_syncs_with_the_host_once(case: str, dense_above: float) -> None:
    generator = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 8, 1000, 64, device="cuda", generator=generator, dtype=torch.bfloat16)
    k = torch.randn(1, 2, 1000, 64, device="cuda", generator=generator, dtype=torch.bfloat16)
    ctx = AttentionContext.for_inputs(q, k)
    identifier = get_pattern(case.split()[0]).build(**VECTORISED[case], dense_above=dense_above)
    identifier.identify(q, k, ctx)  # first call: lazy initialisation may sync
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            identifier.identify(q, k, ctx)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # One warning per synchronising call; the mode also warns once that it is a prototype (not a sync).
    syncs = [str(w.message) for w in caught if "called a synchronizing CUDA operation" in str(w.message)]
    assert len(syncs) == 1, syncs


def test_host_copy_reads_the_values_on_the_cpu() -> None:
    values = torch.tensor([3, 1, 4, 1, 5], dtype=torch.int64)
    read = host_copy(values)
    assert read() == [3, 1, 4, 1, 5]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="times a CUDA stream: needs a GPU")
def test_host_copy_waits_for_the_copy_not_for_kernels_queued_after_it() -> None:
    values = torch.arange(7, device="cuda", dtype=torch.int64) * 3
    torch.cuda.synchronize()
    read = host_copy(values)
    torch.cuda._sleep(2_000_000_000)  # about a second of GPU time, queued after the copy
    after = torch.cuda.Event()
    after.record()
    assert read() == [3 * i for i in range(7)]
    assert not after.query()  # the host has the values while the later kernel still runs
    torch.cuda.synchronize()
