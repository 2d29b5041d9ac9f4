"""An inter-process lock on one install target, so two prefetches of the same model never share a
temporary file: the second waits, then finds the model installed and verifies it.

The lock is the OS's (flock / msvcrt), tied to an open file: it is released when its holder exits,
however it exits, so a crashed download never leaves a stale lock behind.

POSIX: `<target>.lock` is removed on release, so no `.lock` file stays in the model folder. A lock is
held only while the file its holder locked is still the one at the path: after `flock` the holder
compares the inode of its descriptor with the path's (`fstat` vs `stat`) and, if the file was removed
or replaced meanwhile (a previous holder's release), closes it and locks the new one. Release never
raises and always closes the descriptor (closing drops the lock); it removes the path only while the
path is still the file it locked, so a lock file removed by hand while held, and re-created by a
second installer, is not removed from under that installer. (Such a second installer cannot tell
that the first still runs: both then install, each through its own temporary names, and each verifies
what it finds.)

Windows: the file cannot be removed while open, and stays. `msvcrt.LK_LOCK` gives up after 10 s, so
the lock is taken with `LK_NBLCK` in a loop that sleeps between tries, until the timeout.

`timeout=None` (the default) waits as long as the holder holds the lock; a number of seconds raises
`AssetError` naming the lock file once it has passed.
"""
from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from ..runtime.errors import AssetError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
    import msvcrt

POLL_S = 0.1  # between tries, while another process holds the lock (Windows, or with a timeout)


def lock_path(target: Path) -> Path:
    return target.with_name(target.name + ".lock")


def _timed_out(lock: Path, timeout: float) -> AssetError:
    return AssetError(f"could not lock {lock} within {timeout:g} s: another install of {lock.name[:-5]} "
                      "holds it. Wait for it to finish and run again; if no install is running, remove the "
                      "lock file")


def _same_file(fd: int, path: Path) -> bool:
    try:
        held, now = os.fstat(fd), os.stat(path)
    except OSError:  # the path was removed
        return False
    return (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino)


def _flock(fd: int, deadline: float | None, lock: Path, timeout: float | None) -> None:
    if deadline is None:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise _timed_out(lock, timeout) from None
            time.sleep(POLL_S)


def _acquire_posix(lock: Path, timeout: float | None) -> int:
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            _flock(fd, deadline, lock, timeout)
            if _same_file(fd, lock):
                return fd  # the file we hold is still the lock (not one a previous holder removed)
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # we locked a removed file: lock the one now at the path


def _release_posix(fd: int, lock: Path) -> None:
    """Never raises; the descriptor is always closed."""
    try:
        if _same_file(fd, lock):
            # before unlocking: a waiter on this file then sees it was removed and locks a new one
            os.unlink(lock)
    except OSError:
        pass  # removed meanwhile: nothing of ours to remove
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)  # drops the lock


def _acquire_windows(fh, lock: Path, timeout: float | None) -> None:
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        fh.seek(0)
        try:
            msvcrt.locking(fh.fileno(), msvcrt.LK_NBLCK, 1)
            return
        except OSError:  # held by another process
            if deadline is not None and time.monotonic() >= deadline:
                raise _timed_out(lock, timeout) from None
            time.sleep(POLL_S)


@contextlib.contextmanager
def install_lock(target: Path, timeout: float | None = None):
    """Hold `<target>.lock` beside `target` for the duration of the block.

    `timeout`: seconds to wait for another holder (None: as long as it holds the lock)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = lock_path(target)
    if fcntl is None:
        fh = open(lock, "a+b")
        try:
            _acquire_windows(fh, lock, timeout)
            try:
                yield
            finally:
                with contextlib.suppress(OSError):
                    fh.seek(0)
                    msvcrt.locking(fh.fileno(), msvcrt.LK_UNLCK, 1)
        finally:
            with contextlib.suppress(OSError):
                fh.close()
        return
    fd = _acquire_posix(lock, timeout)
    try:
        yield
    finally:
        _release_posix(fd, lock)
