"""Where Triton kernels can run in this process."""

from __future__ import annotations

import os

import torch


def triton_interpreted() -> bool:
    """True when TRITON_INTERPRET=1: kernels then run on the CPU (slowly), as the CPU tests do."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_can_run(device: torch.device) -> bool:
    """Triton kernels run on CUDA devices, and on the CPU under the interpreter."""
    return device.type == "cuda" or (device.type == "cpu" and triton_interpreted())
