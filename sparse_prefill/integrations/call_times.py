"""How long each layer's attention call took, for choosing settings by time (``calibrate --cost time``).

On a GPU each call is bracketed by two CUDA events recorded on its device's current stream: nothing waits
inside the forward, and :meth:`CallTimes.layer_seconds` reads the elapsed times afterwards. On the CPU the
call itself is synchronous and a wall clock brackets it. A layer called several times in one forward (padding
runs per sequence, a model that reuses a layer) sums its calls. Knows nothing of Hugging Face.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["CallTimes"]


@dataclass
class CallTimes:
    """Start and end marks of each timed attention call, by layer."""

    _marks: list[tuple[int | None, Any, Any]] = field(default_factory=list)

    def start(self, like: torch.Tensor) -> Any:
        """A start mark on ``like``'s device: a CUDA event recorded on that device's current stream (a layer
        placed on another GPU than the current one is timed where it runs), or the wall clock."""
        if like.is_cuda:
            stream = torch.cuda.current_stream(like.device)
            event = torch.cuda.Event(enable_timing=True)
            event.record(stream)
            return event, stream
        return time.perf_counter()

    def stop(self, layer: int | None, started: Any) -> None:
        """Close the call that :meth:`start` opened as ``started``."""
        if isinstance(started, tuple):
            start_event, stream = started
            ended = torch.cuda.Event(enable_timing=True)
            ended.record(stream)
            self._marks.append((layer, start_event, ended))
        else:
            self._marks.append((layer, started, time.perf_counter()))

    def layer_seconds(self) -> dict[int | None, float]:
        """Seconds per layer, its calls summed (each GPU call's end waited for, on whichever device it ran)."""
        seconds: dict[int | None, float] = {}
        for layer, started, ended in self._marks:
            if isinstance(ended, torch.cuda.Event):
                ended.synchronize()
                took = started.elapsed_time(ended) / 1000.0
            else:
                took = ended - started
            seconds[layer] = seconds.get(layer, 0.0) + took
        return seconds

    def reset(self) -> None:
        self._marks = []
