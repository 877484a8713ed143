"""Every Triton kernel builds for a CUDA target with the arguments real calls pass, each integer argument equal to 1
included (see tests/cuda_builds.py: the interpreter, where the other kernel tests run, cannot see that failure)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).with_name("cuda_builds.py")
KERNELS = {"_anchor_pool_kernel", "_stripe_scan_kernel", "_stripe_fwd", "_block_fwd", "_block_mass_kernel",
           "_partial_kernel", "_top_blocks_kernel"}


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600)


def test_every_kernel_builds_for_cuda_with_integer_arguments_equal_to_one(tmp_path: Path) -> None:
    launches = tmp_path / "launches.json"
    captured = _run("capture", str(launches))
    assert captured.returncode == 0, captured.stderr[-3000:]
    launched = {launch["name"] for launch in json.loads(launches.read_text())}
    assert launched == KERNELS, f"launched {sorted(launched)}, expected {sorted(KERNELS)} (a new kernel: add a call)"
    built = _run("build", str(launches))
    assert built.returncode == 0, built.stdout[-6000:] + built.stderr[-2000:]
