"""Keep freed CPU memory in the process while a model pass runs, so activations stop costing page faults.

Why: glibc hands every large block (>= 128 KiB, or any block > 64 MiB in a thread's own arena) out as a
fresh mmap and unmaps it on free. A conv net allocates and frees a few hundred-megabyte activations per
layer, so the kernel zero-fills and faults in the same memory again and again: on a 2-core CPU a third
of an untiled Real-ESRGAN pass was kernel time (issue 14). During a pass we make glibc serve big blocks
from the heap and keep what is freed; afterwards the settings go back to glibc's defaults and
`malloc_trim(0)` returns every free page, so the RSS after a run is what it was without this.

Process-wide effects (documented in docs/speed.md):
- `configure()` sets M_ARENA_MAX=1 once: a thread's own arena always mmaps blocks > 64 MiB, so a worker
  thread (ComfyUI runs prompts in one) only gains when it shares the main arena. It affects threads that
  first allocate after the call, which is why the ComfyUI bridge should call it when it is imported,
  before ComfyUI starts its prompt worker. Cost: threads share one malloc lock.
- `reuse()` (around each CPU pass): M_MMAP_MAX=0 and M_TRIM_THRESHOLD=retained bound; on the last exit,
  glibc's defaults (65536 and 128 KiB) come back and the heap is trimmed. During the pass the heap may
  hold up to about 2x the pass's own peak above its start (freed blocks are kept; glibc 2.36 cannot reuse
  a freed block for an aligned request of the same size, so some are kept beside new ones).

Switch: DREAMFORGE_CPU_MALLOC=0 turns all of it off (read at every call). It is also off when the user
configured glibc malloc through the environment (MALLOC_*_ variables, GLIBC_TUNABLES), and a no-op where
the C library is not glibc (macOS, Windows, musl). DREAMFORGE_CPU_MALLOC_KEEP_MB bounds the free memory
the heap top may keep during a pass (default 1024, at most 2047: mallopt takes an int).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass

log = logging.getLogger("dreamforge_upscale")

ENV_SWITCH = "DREAMFORGE_CPU_MALLOC"
ENV_KEEP_MB = "DREAMFORGE_CPU_MALLOC_KEEP_MB"
USER_ENV = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
            "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")
# mallopt parameter numbers and glibc's defaults (malloc.h, malloc/malloc.c)
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
DEFAULT_MMAP_MAX, DEFAULT_TRIM_THRESHOLD = 65536, 128 * 1024
DEFAULT_KEEP_MB = 1024
MAX_KEEP_MB = 2047  # mallopt's value is a C int


@dataclass(frozen=True)
class AllocatorStatus:
    active: bool  # the settings apply to this process
    reason: str  # why (not)
    keep_bytes: int = 0


class _Glibc:
    """The three glibc entry points used here, or None off glibc."""

    def __init__(self, lib):
        self.mallopt = lib.mallopt
        self.mallopt.argtypes, self.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        self.malloc_trim = lib.malloc_trim
        self.malloc_trim.argtypes, self.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int


def _load_glibc(platform: str = sys.platform) -> _Glibc | None:
    if not platform.startswith("linux"):
        return None
    try:
        lib = ctypes.CDLL(None)
        lib.gnu_get_libc_version  # only glibc has it (musl has mallopt as a stub)
        return _Glibc(lib)
    except (OSError, AttributeError):
        return None


_lock = threading.Lock()  # the allocator is process-wide: so is this bookkeeping
_state = {"glibc": None, "loaded": False, "arena_set": False, "logged": False, "depth": 0}


def _glibc() -> _Glibc | None:
    if not _state["loaded"]:
        _state["glibc"], _state["loaded"] = _load_glibc(), True
    return _state["glibc"]


def status(environ=None, glibc_present: bool | None = None) -> AllocatorStatus:
    """Whether the reuse applies here and now, and the retained bound (pure: reads, changes nothing)."""
    env = os.environ if environ is None else environ
    if env.get(ENV_SWITCH, "1").strip().lower() in ("0", "off", "false", "no"):
        return AllocatorStatus(False, f"switched off by {ENV_SWITCH}={env[ENV_SWITCH]}")
    user = [k for k in USER_ENV if k in env]
    if user:
        return AllocatorStatus(False, f"glibc malloc is configured by the environment ({', '.join(user)}): left alone")
    present = (_glibc() is not None) if glibc_present is None else glibc_present
    if not present:
        return AllocatorStatus(False, f"not glibc on Linux ({sys.platform}): nothing to tune")
    return AllocatorStatus(True, "glibc: freed memory is reused during CPU passes", keep_bytes(env))


def keep_bytes(environ=None) -> int:
    """The bound on free memory the heap top keeps during a pass, clamped to [16, 2047] MiB."""
    env = os.environ if environ is None else environ
    raw = env.get(ENV_KEEP_MB, "")
    try:
        mb = int(raw) if raw.strip() else DEFAULT_KEEP_MB
    except ValueError:
        log.warning("DreamForge: %s=%r is not a whole number of MiB; using %d", ENV_KEEP_MB, raw, DEFAULT_KEEP_MB)
        mb = DEFAULT_KEEP_MB
    return min(max(mb, 16), MAX_KEEP_MB) * 2**20


def _log_once(st: AllocatorStatus) -> None:
    if not _state["logged"]:
        _state["logged"] = True
        log.info("DreamForge CPU memory reuse: %s%s (set %s=0 to turn off)", st.reason,
                 f", heap top keeps <= {st.keep_bytes >> 20} MiB during a pass" if st.active else "", ENV_SWITCH)


def configure(device=None) -> AllocatorStatus:
    """Once per process: threads that start allocating after this share glibc's main arena.

    `device`: the host's compute device; nothing is changed unless it is the CPU (default)."""
    if getattr(device, "type", "cpu") != "cpu":
        return AllocatorStatus(False, f"compute device is {device}: CPU memory reuse not needed")
    st = status()
    with _lock:
        _log_once(st)
        if st.active and not _state["arena_set"]:
            _state["arena_set"] = bool(_glibc().mallopt(M_ARENA_MAX, 1))
    return st


def trim_threshold(keep: int) -> int:
    """mallopt's M_TRIM_THRESHOLD value for keeping `keep` free bytes: -1 (never trim during the pass) past
    what a C int holds; the pass's own peak then bounds the heap, and the end of the pass trims it."""
    return keep if keep <= MAX_KEEP_MB * 2**20 else -1


def release_for_retry() -> bool:
    """After an out-of-memory inside a pass: glibc's defaults back and the free heap returned now, for the
    rest of the pass. Memory is tight by then, and with every block served from the heap a fragmented
    heap top can refuse what fresh mappings would still fit. The pass's end restores and trims again
    (idempotent). Returns whether a pass was active."""
    with _lock:
        if _state["depth"] == 0 or _glibc() is None:
            return False
        libc = _glibc()
        libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
        libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
        libc.malloc_trim(0)
        return True


@contextmanager
def reuse(device=None, enabled: bool = True, keep: int | None = None):
    """Around one CPU pass: reuse freed heap memory; afterwards defaults back and free pages returned.

    `keep`: the pass's predicted activation bytes (tiling/cost.py). The heap top then keeps at least that
    much free memory, so a model whose single activations exceed the default bound (RRDB at 4x on a
    large image: > 1 GiB each) still reuses them instead of faulting them in again.
    Nested and concurrent passes are counted: only the last one out restores and trims. A no-op for
    non-CPU devices, wherever `status()` says it does not apply, and with `enabled=False` (the plan
    chosen by tiling/cost.py fits the memory only without the extra heap reuse keeps).
    """
    st = status() if getattr(device, "type", "cpu") == "cpu" else configure(device)
    if st.active and not enabled:
        st = AllocatorStatus(False, "off for this pass: the fastest plan that fits needs the memory reuse keeps")
    if not st.active:
        yield st
        return
    configure()
    libc = _glibc()
    with _lock:
        if _state["depth"] == 0:
            libc.mallopt(M_MMAP_MAX, 0)
            libc.mallopt(M_TRIM_THRESHOLD, trim_threshold(max(st.keep_bytes, keep or 0)))
        _state["depth"] += 1
    try:
        yield st
    finally:
        with _lock:
            _state["depth"] -= 1
            if _state["depth"] == 0:
                libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
                libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
                libc.malloc_trim(0)
