"""bench/profiling.py: the runtime-call tallies of a profiled window."""
from __future__ import annotations

from types import SimpleNamespace

from bench.profiling import ALLOCS, HOST_WAITS, LAUNCHES, calls


def _event(name: str, us: float) -> SimpleNamespace:
    return SimpleNamespace(name=name, cpu_time_total=us)


def test_calls_count_and_time_only_the_named_runtime_calls():
    events = [_event("cudaLaunchKernel", 4.0), _event("cudaLaunchKernel", 6.0), _event("cudaMemcpyAsync", 3.0),
              _event("cudaFree", 900.0), _event("cudaStreamSynchronize", 50.0), _event("aten::add", 20.0)]
    assert calls(events, LAUNCHES) == (3, 13.0)
    assert calls(events, ALLOCS) == (1, 900.0)
    assert calls(events, HOST_WAITS) == (1, 50.0)
    assert calls([], LAUNCHES) == (0, 0.0)
