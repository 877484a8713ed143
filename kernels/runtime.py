"""Where Triton kernels can run in this process."""

from __future__ import annotations

import os
from typing import Callable

import torch


# Every launch asks for floating-point fusion (a * b + c as one FMA): each kernel here was checked and timed with
# it, Triton 3.9 warns at every compile that leaves it to the default, and Triton 3.10's default turns it off.
FP_FUSION = {"enable_fp_fusion": True}


def triton_interpreted() -> bool:
    """True when TRITON_INTERPRET=1: kernels then run on the CPU (slowly), as the CPU tests do."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_can_run(device: torch.device) -> bool:
    """Triton kernels run on CUDA devices, and on the CPU under the interpreter."""
    return device.type == "cuda" or (device.type == "cpu" and triton_interpreted())


def host_copy(values: torch.Tensor) -> Callable[[], list]:
    """Queue ``values``' copy to the host now; the returned function waits for that copy alone and reads it.

    ``values.tolist()`` waits for every kernel queued on the stream, so kernels launched after the copy
    (a key list's write pass, its executor) would run before the host could go on, and the GPU would then
    idle while the host launches the next ones. Here the host waits only for the kernels queued before the
    copy (a pinned buffer and an event on CUDA; on the CPU the values are read when asked for).
    """
    if values.device.type != "cuda":
        return values.tolist
    host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
    host.copy_(values, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record(torch.cuda.current_stream(values.device))

    def read() -> list:
        copied.synchronize()
        return host.tolist()

    return read
