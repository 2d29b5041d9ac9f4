"""Peak resident memory of one call, above the process's RSS just before it (shared by the benchmarks).

On Linux the kernel's high-water mark is reset before the call (`/proc/self/clear_refs` "5") and read
after it (`VmHWM`): exact, and nothing runs beside the timed call. A sampler thread polling every few
ms slowed 2-core CPU passes by about 10% (it preempts a compute thread, and the other one waits for it
at each parallel op), so it is only the fallback where the reset is not available (macOS, Windows, old
kernels), and then it also catches peaks between samples with the lifetime high-water mark.
"""
from __future__ import annotations

import ctypes
import gc
import re
import resource
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import psutil

CLEAR_REFS = "/proc/self/clear_refs"
STATUS = "/proc/self/status"


def rss() -> int:
    return psutil.Process().memory_info().rss


def trim_heap() -> None:
    """Return freed heap to the OS so the baseline is what is really held."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@dataclass
class PeakResult:
    value: Any
    seconds: float
    baseline: int  # RSS before the call
    peak_sampled: int  # the sampler's maximum (the fallback), else the RSS after the call
    peak_hwm: int  # the high-water mark during the call (0 when it cannot be read for this call alone)
    method: str = "hwm"  # "hwm": kernel high-water mark reset before the call; "sampler": polling thread

    @property
    def above(self) -> int:
        return max(self.peak_sampled, self.peak_hwm) - self.baseline


def _vm_hwm() -> int:
    with open(STATUS) as f:
        return int(re.search(r"^VmHWM:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024


def reset_hwm() -> bool:
    """Reset the kernel's peak-RSS mark for this process; False where that is not possible."""
    try:
        with open(CLEAR_REFS, "w") as f:
            f.write("5")
        return _vm_hwm() <= rss() + (1 << 20)  # the mark really dropped to the current RSS
    except (OSError, AttributeError, ValueError):
        return False


def measure_peak(fn: Callable[[], Any], interval: float = 0.002) -> PeakResult:
    trim_heap()
    baseline = rss()
    if reset_hwm():
        started = time.perf_counter()
        value = fn()
        seconds = time.perf_counter() - started
        return PeakResult(value, seconds, baseline, rss(), _vm_hwm(), "hwm")
    return _measure_with_sampler(fn, interval, baseline)


def _measure_with_sampler(fn: Callable[[], Any], interval: float, baseline: int) -> PeakResult:
    hwm_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peak = [baseline]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    try:
        value = fn()
    finally:
        seconds = time.perf_counter() - started
        stop.set()
        sampler.join()
    peak[0] = max(peak[0], rss())
    hwm_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return PeakResult(value, seconds, baseline, peak[0], hwm_after if hwm_after > hwm_before else 0, "sampler")
