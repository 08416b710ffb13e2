"""bench/throughput.py --profile: where one window of each training path spends its time."""
from __future__ import annotations

from pathlib import Path

from torch._C._profiler import _ExperimentalConfig
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from bench.train_paths import TrainBench, timed, window_steps


def launched_us(event) -> float:
    """Microseconds of device work launched inside a profiled host event and its children (a range's own
    span on the device, listed among its kernels under its own name, not counted)."""
    own = sum(k.duration for k in event.kernels if k.name != event.name)
    return own + sum(launched_us(child) for child in event.cpu_children)


# CUDA runtime calls in which the host waits for the device.
HOST_WAITS = frozenset({"cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize"})
# Runtime calls that queue device work: their count per step is the host's launch load.
LAUNCHES = frozenset({"cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx",
                      "cudaMemcpyAsync", "cudaMemsetAsync"})
# Runtime calls that allocate or free memory, or copy synchronously: each can stall the host (cudaFree and
# cudaFreeHost wait for the whole device), none should recur once the caching allocators are warm.
ALLOCS = frozenset({"cudaMalloc", "cudaFree", "cudaHostAlloc", "cudaMallocHost", "cudaFreeHost", "cudaHostRegister",
                    "cudaMemcpy"})


def calls(events, names: frozenset[str]) -> tuple[int, float]:
    """(count, host microseconds) of the CUDA runtime calls named `names` among profiler events."""
    hits = [e for e in events if e.name in names]
    return len(hits), sum(e.cpu_time_total for e in hits)


def all_threads_config() -> _ExperimentalConfig:
    """Profile every thread (the prefetch thread's chunks too), where this torch can."""
    try:
        return _ExperimentalConfig(profile_all_threads=True)
    except TypeError:  # an older torch: the calling thread only
        return _ExperimentalConfig()


def profile_train(b: TrainBench, device, steps, path: Path) -> None:
    """Write where one window of each path spends its time to `path` (torch.profiler, every thread): per step
    the wall time, the host's time in the loader (with prefetch: waiting for the thread) and in the prefetch
    thread, the host's waits for the device (CUDA synchronisations; the window's end is one), the device's
    kernel time (a GPU) with the loader's and the prefetch thread's shares, the launches (kernels, async
    copies and fills) per step and their host time, and the allocations in the window (cudaMalloc, cudaFree,
    pinned memory, synchronous copies); then the operators by self device time (a GPU) and by self host time."""
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    steps = window_steps(steps, b.epoch_steps)
    lines = []
    for name, fn in (("real", lambda: b.real(steps, True)), ("pure", lambda: b.pure(steps))):
        with profile(activities=activities, experimental_config=all_threads_config()) as prof:
            wall, _ = timed(fn, device)
        events = prof.events()
        # Device work: kernels and copies, not the spans of record_function ranges (user annotations), as
        # the profiler's own table totals them.
        kernels = sum(e.self_device_time_total for e in events
                      if e.device_type != DeviceType.CPU and not getattr(e, "is_user_annotation", False))
        ranges = {r: [e for e in events if e.name == r and e.device_type == DeviceType.CPU]
                  for r in ("loader", "prefetch")}
        (waits, wait_us), (launches, launch_us), (allocs, alloc_us) = (calls(events, names)
                                                                      for names in (HOST_WAITS, LAUNCHES, ALLOCS))
        ms = lambda us: f"{us / 1000 / steps:.2f}"  # noqa: E731 (microseconds in the window -> ms per step)
        lines.append(f"{name}: {steps} steps; per step (ms): wall {1000 * wall / steps:.2f} under the profiler, "
                     f"host in the loader {ms(sum(e.cpu_time_total for e in ranges['loader']))}, in the prefetch "
                     f"thread {ms(sum(e.cpu_time_total for e in ranges['prefetch']))}, waiting for the device "
                     f"{ms(wait_us)} ({waits} waits), device kernels {ms(kernels)} "
                     f"(the loader's {ms(sum(map(launched_us, ranges['loader'])))}, the prefetch thread's "
                     f"{ms(sum(map(launched_us, ranges['prefetch'])))}), launches {launches / steps:.1f} "
                     f"({ms(launch_us)} host), allocations {allocs} in the window ({ms(alloc_us)} host)")
        table = prof.key_averages().table
        if cuda:  # what the device did, then what the host did: one of the two is the limit
            lines.append(table(sort_by="self_device_time_total", row_limit=25))
        lines.append(table(sort_by="self_cpu_time_total", row_limit=25))
    path.write_text("\n".join(lines) + "\n")
