"""Timers and peak-memory probes.

CPU: wall time of one call with ``time.perf_counter`` and the process's resident-memory high-water mark. Before
each call the kernel's mark is reset (``echo 5 > /proc/self/clear_refs``) and the current RSS read (inputs, and
for ``bwd`` the graph of the untimed forward, are resident by then); after the call ``VmHWM`` from
``/proc/self/status`` minus that RSS is the call's peak memory. Both come from the same call. Where ``clear_refs``
is not writable (not Linux, a locked-down container; or forced with FUSEDPG_BENCH_MEMORY=subprocess) the peak is
measured in a fresh subprocess per measurement instead, and the time still in this process.

CUDA: ``triton.testing.do_bench`` (median and 20/80 quantiles, L2 flushed between calls) for time (the same method
with an untimed setup for ``bwd``), and ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``
minus what was allocated before the call.
"""
from __future__ import annotations

import ctypes
import gc
import os
import time
from typing import Callable, List, Optional, Sequence, Tuple

import torch

QUANTILES = (0.5, 0.2, 0.8)


def quantiles(samples: Sequence[float], qs: Sequence[float] = QUANTILES) -> List[float]:
    """Linear-interpolation quantiles (numpy's default method) of a non-empty sample."""
    xs = sorted(samples)
    if not xs:
        raise ValueError("quantiles of an empty sample")
    out = []
    for q in qs:
        pos = q * (len(xs) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(xs) - 1)
        out.append(xs[lo] + (xs[hi] - xs[lo]) * (pos - lo))
    return out


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def hwm_bytes() -> int:
    return _status_kib("VmHWM") * 1024


def clear_refs_writable() -> bool:
    """True when the resident high-water mark can be reset in place (FUSEDPG_BENCH_MEMORY=subprocess forces no)."""
    if os.environ.get("FUSEDPG_BENCH_MEMORY", "").strip().lower() == "subprocess":
        return False
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        rss_bytes()
        return True
    except OSError:
        return False


def _libc_trim() -> Callable[[], None]:
    # Freed heap pages that glibc keeps would count in the baseline RSS and be reused unseen by the next call,
    # hiding part of its peak; malloc_trim hands them back first. Large tensors are mmapped and unmapped anyway.
    try:
        libc = ctypes.CDLL("libc.so.6")
        return lambda: libc.malloc_trim(0)
    except (OSError, AttributeError):
        return lambda: None


_trim = _libc_trim()


def settle() -> None:
    """Free what the previous call left behind so the next baseline reads only live tensors."""
    gc.collect()
    _trim()


def reset_hwm() -> int:
    """Reset the high-water mark to the current RSS and return that RSS (the baseline of the next call)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return rss_bytes()


Setup = Optional[Callable[[], None]]


def cpu_sample(call: Callable[[], None], reset: Callable[[], None], setup: Setup = None, track_memory: bool = True
               ) -> Tuple[float, Optional[int]]:
    """Run ``setup`` (untimed) then ``call`` once: (milliseconds, peak RSS above the RSS just before ``call`` in
    bytes, or None when memory is not tracked here)."""
    reset()
    if setup is not None:
        setup()
    settle()
    base = reset_hwm() if track_memory else 0
    gc.disable()  # as timeit does: a collection pause inside the timed call is noise, not the op's cost
    try:
        t0 = time.perf_counter()
        call()
        ms = (time.perf_counter() - t0) * 1e3
    finally:
        gc.enable()
    return ms, (max(0, hwm_bytes() - base) if track_memory else None)


def fresh_process_peak(call: Callable[[], None], reset: Callable[[], None], setup: Setup = None) -> int:
    """Peak of one call in a process whose high-water mark cannot be reset: VmHWM after the call minus the RSS
    before it. An upper bound if something earlier in the process (input generation, a ``bwd`` mode's forward)
    peaked higher."""
    reset()
    if setup is not None:
        setup()
    settle()
    base = rss_bytes()
    call()
    return max(0, hwm_bytes() - base)


def cuda_measure(call: Callable[[], None], reset: Callable[[], None], leaves: Sequence[torch.Tensor], reps: int,
                 setup: Setup = None) -> Tuple[List[float], int]:
    """([median, q20, q80] ms, peak bytes above the pre-call allocation) of ``call`` on the current CUDA device."""
    import triton.testing

    def prepared():
        reset()
        if setup is not None:
            setup()

    prepared()
    call()  # compile, autotune and allocator warm-up stay out of both numbers
    prepared()
    settle()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    call()
    end.record()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    est = max(start.elapsed_time(end), 1e-3)
    reset()
    if setup is not None:
        return _cuda_events(call, prepared, reps), int(peak)
    # do_bench picks its repeat count from a time budget: ask for about `reps` timed calls whatever the shape.
    ms = triton.testing.do_bench(call, warmup=max(1.0, 2 * est), rep=max(5.0, reps * est),
                                 grad_to_none=list(leaves), quantiles=list(QUANTILES))
    return [float(x) for x in ms], int(peak)


def _cuda_events(call: Callable[[], None], prepared: Callable[[], None], reps: int) -> List[float]:
    """do_bench's method (L2 flushed, CUDA events around the call) for calls that need an untimed setup each time,
    which do_bench cannot exclude: ``bwd`` after a fresh forward."""
    from triton import runtime

    driver = runtime.driver.active
    cache = driver.get_empty_cache_for_benchmark()
    flush = getattr(driver, "clear_cache", None) or (lambda c: c.zero_())
    times = []
    for _ in range(max(reps, 1)):
        prepared()
        flush(cache)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return quantiles(times)
