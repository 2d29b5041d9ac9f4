"""Peak resident memory of one call, above the process's RSS just before it (shared by the benchmarks).

A 2 ms psutil sampler catches short peaks between samples of the kernel's high-water mark; the
high-water mark (ru_maxrss) counts only when it moved during the call.
"""
from __future__ import annotations

import ctypes
import gc
import resource
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import psutil


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
    peak_sampled: int
    peak_hwm: int  # 0 when the high-water mark did not move during the call

    @property
    def above(self) -> int:
        return max(self.peak_sampled, self.peak_hwm) - self.baseline


def measure_peak(fn: Callable[[], Any], interval: float = 0.002) -> PeakResult:
    trim_heap()
    baseline = rss()
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
    return PeakResult(value, seconds, baseline, peak[0], hwm_after if hwm_after > hwm_before else 0)
