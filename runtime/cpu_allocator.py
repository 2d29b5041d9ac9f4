"""Keep freed CPU memory in the process while a model pass runs, so activations stop costing page faults.

Why: glibc hands every large block (>= 128 KiB, or any block > 64 MiB in a thread's own arena) out as a
fresh mmap and unmaps it on free. A conv net allocates and frees a few hundred-megabyte activations per
layer, so the kernel zero-fills and faults in the same memory again and again: on a 2-core CPU a third
of an untiled Real-ESRGAN pass was kernel time. During a pass we make glibc serve big blocks from the
heap and keep what is freed; afterwards the settings go back to glibc's defaults and `malloc_trim(0)`
returns every free page, so the RSS after a run is what it was without this.

What changes, and for how long (docs/speed.md has the measurements):
- `reuse()` (around each CPU pass): M_MMAP_MAX=0 and M_TRIM_THRESHOLD=retained bound; on the last exit,
  glibc's defaults (65536 and 128 KiB) come back and the heap is trimmed. These are process-wide values
  while a pass runs (glibc has no per-thread ones). During the pass the heap may hold up to about 2x the
  pass's own peak above its start (freed blocks are kept; glibc 2.36 cannot reuse a freed block for an
  aligned request of the same size, so some are kept beside new ones). Importing the pack changes nothing.
- In a thread's own arena (ComfyUI runs prompts in a worker thread) glibc maps every block > 64 MiB
  freshly whatever M_MMAP_MAX says, so there reuse only covers smaller blocks. Sharing the main arena
  (M_ARENA_MAX=1) would cover them too, but that setting is process-wide and permanent: every thread of
  the host, any other pack's included, then allocates from one arena under one lock. So it is opt-in:
  `configure()` sets it only when DREAMFORGE_CPU_MALLOC_ARENA=1 (the ComfyUI bridge calls it at
  registration, before the prompt worker starts); by default it changes nothing. The command line and
  the API run passes in the main thread, which uses the main arena anyway.

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
ENV_ARENA = "DREAMFORGE_CPU_MALLOC_ARENA"  # opt-in: worker threads share glibc's main arena (process-wide)
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
        worker = threading.current_thread() is not threading.main_thread() and not _state["arena_set"]
        log.info("DreamForge CPU memory reuse: %s%s%s (set %s=0 to turn off)", st.reason,
                 f", heap top keeps <= {st.keep_bytes >> 20} MiB during a pass" if st.active else "",
                 f"; in this worker thread blocks > 64 MiB are still mapped freshly ({ENV_ARENA}=1 covers them, "
                 "process-wide: see docs/speed.md)" if st.active and worker else "", ENV_SWITCH)


def arena_opted_in(environ=None) -> bool:
    """Whether the host asked for worker threads to share glibc's main arena (DREAMFORGE_CPU_MALLOC_ARENA=1)."""
    env = os.environ if environ is None else environ
    return env.get(ENV_ARENA, "").strip().lower() in ("1", "on", "true", "yes")


def configure(device=None, environ=None) -> AllocatorStatus:
    """Opt-in, once per process: with DREAMFORGE_CPU_MALLOC_ARENA=1, threads that start allocating after this
    share glibc's main arena (M_ARENA_MAX=1), so reuse also covers their blocks > 64 MiB. Without it
    (the default) nothing is changed. Process-wide and permanent, for every thread of the host.

    `device`: the host's compute device; nothing is changed unless it is the CPU (default)."""
    if getattr(device, "type", "cpu") != "cpu":
        return AllocatorStatus(False, f"compute device is {device}: CPU memory reuse not needed")
    st = status(environ)
    if not st.active or not arena_opted_in(environ):
        return st
    with _lock:
        if not _state["arena_set"]:
            _state["arena_set"] = bool(_glibc().mallopt(M_ARENA_MAX, 1))
            if _state["arena_set"]:
                log.info("DreamForge: %s=1: threads started from now on share glibc's main malloc arena "
                         "(process-wide, for every thread of this process)", ENV_ARENA)
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
    if getattr(device, "type", "cpu") != "cpu":
        yield AllocatorStatus(False, f"compute device is {device}: CPU memory reuse not needed")
        return
    st = status()
    if st.active and not enabled:
        st = AllocatorStatus(False, "off for this pass: the fastest plan that fits needs the memory reuse keeps")
    if not st.active:
        yield st
        return
    libc = _glibc()
    with _lock:
        _log_once(st)
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
