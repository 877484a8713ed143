"""CallTimes: wall-clock marks on the CPU; on a GPU, events on the stream of the device the call ran on."""

import time
from types import SimpleNamespace

import pytest
import torch

from sparse_prefill.integrations.call_times import CallTimes


def test_cpu_calls_are_timed_by_the_wall_clock_and_summed_per_layer():
    times = CallTimes()
    for layer, pause in ((0, 0.01), (1, 0.0), (0, 0.01)):
        started = times.start(torch.zeros(1))
        time.sleep(pause)
        times.stop(layer, started)
    seconds = times.layer_seconds()
    assert set(seconds) == {0, 1} and seconds[0] >= 0.02 and 0 <= seconds[1] < seconds[0]
    times.reset()
    assert times.layer_seconds() == {}


def test_gpu_calls_are_bracketed_on_their_own_devices_stream(monkeypatch):
    """A layer placed on a second GPU (device_map) is timed by events on that GPU's stream, and each end is
    waited for where it ran. Faked CUDA events: the CPU-only test checks the bookkeeping, the GPU runs it."""
    streams = {index: f"stream of cuda:{index}" for index in (0, 1)}
    clock = iter(range(100))

    class FakeEvent:
        def __init__(self, enable_timing: bool) -> None:
            assert enable_timing
            self.stream, self.at, self.waited = None, None, False

        def record(self, stream) -> None:
            self.stream, self.at = stream, next(clock)

        def synchronize(self) -> None:
            self.waited = True

        def elapsed_time(self, end: "FakeEvent") -> float:
            assert end.waited and end.stream == self.stream  # read after waiting, on one device
            return (end.at - self.at) * 1000.0  # ms: one clock tick = one second

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: streams[device.index])
    times = CallTimes()
    on_gpu = {index: SimpleNamespace(is_cuda=True, device=torch.device("cuda", index)) for index in (0, 1)}
    first = times.start(on_gpu[0])
    times.stop(0, first)  # ticks 0 -> 1
    second = times.start(on_gpu[1])
    next(clock)  # one tick of other work inside the call
    times.stop(1, second)  # ticks 2 -> 4
    assert [mark[1].stream for mark in times._marks] == ["stream of cuda:0", "stream of cuda:1"]
    assert times.layer_seconds() == {0: pytest.approx(1.0), 1: pytest.approx(2.0)}
