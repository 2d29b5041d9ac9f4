"""An inter-process lock on one install target, so two prefetches of the same model never share a
temporary file: the second waits, then finds the model installed and verifies it.

The lock is the OS's (flock / msvcrt), tied to an open file: it is released when its holder exits,
however it exits, so a crashed download never leaves a stale lock behind. On POSIX the lock file is
removed on release (a waiter that then holds the removed file notices and locks the new one), so no
`.lock` file stays in the model folder.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
    import msvcrt


@contextlib.contextmanager
def install_lock(target: Path):
    """Hold `<target>.lock` beside `target` for the duration of the block."""
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = target.with_name(target.name + ".lock")
    if fcntl is None:
        with open(lock, "a+b") as fh:
            fh.seek(0)
            msvcrt.locking(fh.fileno(), msvcrt.LK_LOCK, 1)  # retries for 10 s, then raises OSError
            try:
                yield
            finally:
                fh.seek(0)
                msvcrt.locking(fh.fileno(), msvcrt.LK_UNLCK, 1)
        return
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                break  # the file we hold is still the lock (not one a previous holder removed)
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        os.unlink(lock)  # before unlocking: a waiter on this file then sees it was removed and retries
        os.close(fd)
