"""The install lock (assets/file_lock.py): mutual exclusion, a lock file removed while held, a release
that never raises and always closes its descriptor, Windows' wait loop, and the timeout's message.

flock locks belong to an open file description, so two `os.open`s of one path conflict even inside one
process: threads stand in for installers here, and one test uses two real processes."""
from __future__ import annotations

import multiprocessing
import os
import sys
import threading
import time
from pathlib import Path

import pytest

from dreamforge_upscale.assets import file_lock
from dreamforge_upscale.runtime.errors import AssetError
from dreamforge_upscale.assets.file_lock import install_lock, lock_path

posix = pytest.mark.skipif(file_lock.fcntl is None, reason="flock: POSIX only")


def _open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


def _closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


def _held_fd(lock: Path) -> int:
    """The descriptor of this process that has `lock` open (Linux: through /proc/self/fd)."""
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == os.path.realpath(lock):
                return int(name)
        except OSError:
            continue
    raise AssertionError(f"no descriptor open on {lock}")


def _in_thread(fn):
    done = threading.Event()
    errors = []

    def run():
        try:
            fn()
        except BaseException as exc:  # reported by the test
            errors.append(exc)
        finally:
            done.set()

    threading.Thread(target=run, daemon=True).start()
    return done, errors


def _holder(target, events=None):
    """A thread that takes the lock and keeps it until `release` is set: (inside, release, done, errors)."""
    inside, release = threading.Event(), threading.Event()

    def hold():
        with install_lock(target):
            if events is not None:
                events.append("first in")
            inside.set()
            release.wait(10)
            if events is not None:
                events.append("first out")

    return (inside, release, *_in_thread(hold))


@posix
def test_a_second_installer_waits_for_the_first(tmp_path):
    target = tmp_path / "m" / "model.safetensors"
    events = []
    first_in, release_first, done1, err1 = _holder(target, events)

    def second():
        first_in.wait(10)
        with install_lock(target):
            events.append("second in")

    first_in.wait(10)
    done2, err2 = _in_thread(second)
    assert not done2.wait(0.5)  # blocked while the first holds the lock
    release_first.set()
    assert done1.wait(10) and done2.wait(10)
    assert not err1 + err2
    assert events == ["first in", "first out", "second in"]
    assert not lock_path(target).exists()  # no .lock left in the model folder


def _hold_in_process(target: str, holding, release) -> None:
    with install_lock(Path(target)):
        holding.set()
        release.wait(20)


@posix
@pytest.mark.skipif(sys.platform != "linux", reason="fork start method")
def test_two_processes_exclude_each_other(tmp_path):
    target = tmp_path / "model.pth"
    ctx = multiprocessing.get_context("fork")
    holding, release = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_hold_in_process, args=(str(target), holding, release))
    proc.start()
    try:
        assert holding.wait(20)
        with pytest.raises(AssetError, match="another install"):
            with install_lock(target, timeout=0.3):
                pass
        release.set()
        t0 = time.monotonic()
        with install_lock(target, timeout=20):  # the other process's release lets it in
            pass
        assert time.monotonic() - t0 < 20
    finally:
        release.set()
        proc.join(20)
    assert proc.exitcode == 0
    assert not lock_path(target).exists()


@posix
def test_lock_file_removed_while_held(tmp_path):
    """Removed by hand while the first holds it: a second installer may then get a new lock file (it
    cannot see the first), but the first's release neither raises nor removes the second's file, and
    closes its descriptor."""
    target = tmp_path / "model.safetensors"
    lock = lock_path(target)
    before = _open_fds()
    with install_lock(target):
        fd = _held_fd(lock)
        os.unlink(lock)
        second_in, release_second, done, errors = _holder(target)
        assert second_in.wait(10)
        second_ino = os.stat(lock).st_ino
    # the first released without an error (leaving the block did not raise), and left the second's file
    assert _closed(fd)
    assert lock.exists() and os.stat(lock).st_ino == second_ino
    release_second.set()
    assert done.wait(10) and not errors
    assert not lock.exists()
    assert _open_fds() <= before  # no descriptor leaked


@posix
def test_release_after_removal_does_not_raise_and_closes(tmp_path):
    target = tmp_path / "model.safetensors"
    lock = lock_path(target)
    before = _open_fds()
    with install_lock(target):
        fd = _held_fd(lock)
        os.unlink(lock)
    assert _closed(fd)
    assert _open_fds() <= before
    assert not lock.exists()
    with install_lock(target, timeout=1):  # and the lock can be taken again at once
        assert lock.exists()


@posix
def test_release_after_an_error_in_the_block_closes_and_removes(tmp_path):
    target = tmp_path / "model.safetensors"
    before = _open_fds()
    with pytest.raises(RuntimeError, match="download failed"):
        with install_lock(target):
            raise RuntimeError("download failed")
    assert _open_fds() <= before
    assert not lock_path(target).exists()


@posix
def test_a_waiter_on_a_removed_file_locks_the_new_one(tmp_path, monkeypatch):
    """The holder's release removes the file before unlocking it: a waiter that opened it then holds a
    removed file, sees the path is not its inode, closes it and locks the file it then creates."""
    target = tmp_path / "model.safetensors"
    lock = lock_path(target)
    opened = []
    real_open = os.open

    def recording_open(path, *a, **kw):
        fd = real_open(path, *a, **kw)
        if str(path) == str(lock):
            opened.append(fd)
        return fd

    first_in, release_first, done1, err1 = _holder(target)
    assert first_in.wait(10)
    monkeypatch.setattr(file_lock.os, "open", recording_open)
    got = []
    done2, err2 = _in_thread(lambda: got.append(file_lock._acquire_posix(lock, 10)))
    time.sleep(0.3)  # the waiter has opened the first's file and blocks in flock
    release_first.set()
    assert done1.wait(10) and done2.wait(10) and not err1 + err2
    fd = got[0]
    try:
        assert len(opened) == 2 and _closed(opened[0])  # the removed file was closed, the new one locked
        assert fd == opened[1] and os.fstat(fd).st_ino == os.stat(lock).st_ino
    finally:
        file_lock._release_posix(fd, lock)
    assert _closed(fd) and not lock.exists()


@posix
def test_timeout_names_the_lock_and_what_to_do(tmp_path):
    target = tmp_path / "model.safetensors"
    before = _open_fds()
    with install_lock(target):
        t0 = time.monotonic()
        with pytest.raises(AssetError) as info:
            with install_lock(target, timeout=0.3):
                pytest.fail("got a held lock")
        assert 0.3 <= time.monotonic() - t0 < 5
    msg = str(info.value)
    assert str(lock_path(target)) in msg and "0.3 s" in msg and "model.safetensors" in msg
    assert "another install" in msg and "remove the lock file" in msg
    assert _open_fds() <= before


class _FakeMsvcrt:
    """msvcrt.locking as Windows does it: LK_NBLCK fails at once while another process holds the byte."""
    LK_UNLCK, LK_LOCK, LK_NBLCK = 0, 1, 2

    def __init__(self, busy_tries: int):
        self.busy, self.calls = busy_tries, []

    def locking(self, fd, mode, nbytes):
        self.calls.append(mode)
        if mode == self.LK_LOCK:
            raise AssertionError("LK_LOCK gives up after 10 s: never used")
        if mode == self.LK_NBLCK and self.busy:
            self.busy -= 1
            raise PermissionError(13, "Permission denied")


def _as_windows(monkeypatch, fake):
    monkeypatch.setattr(file_lock, "fcntl", None)
    monkeypatch.setattr(file_lock, "msvcrt", fake, raising=False)
    monkeypatch.setattr(file_lock, "POLL_S", 0.01)


def test_windows_waits_past_lk_locks_ten_tries(tmp_path, monkeypatch):
    fake = _FakeMsvcrt(busy_tries=25)  # LK_LOCK would have given up after 10
    _as_windows(monkeypatch, fake)
    with install_lock(tmp_path / "model.pth"):
        assert fake.calls == [fake.LK_NBLCK] * 26
    assert fake.calls[-1] == fake.LK_UNLCK


def test_windows_timeout_is_clear(tmp_path, monkeypatch):
    fake = _FakeMsvcrt(busy_tries=10**9)
    _as_windows(monkeypatch, fake)
    target = tmp_path / "model.pth"
    with pytest.raises(AssetError, match=r"could not lock .*model\.pth\.lock within 0\.2 s: another install"):
        with install_lock(target, timeout=0.2):
            pytest.fail("got a held lock")
    assert fake.LK_UNLCK not in fake.calls  # never held, never unlocked


def test_windows_release_never_raises(tmp_path, monkeypatch):
    fake = _FakeMsvcrt(busy_tries=0)
    _as_windows(monkeypatch, fake)

    def failing_unlock(fd, mode, nbytes):
        if mode == fake.LK_UNLCK:
            raise OSError(22, "Invalid argument")

    monkeypatch.setattr(fake, "locking", failing_unlock)
    with install_lock(tmp_path / "model.pth"):
        pass
