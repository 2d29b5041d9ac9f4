"""Where a layered decode's windows wait between GroupNorms: on the device, in host RAM, or on disk.

"device" keeps the tensors where they are (the budget holds them); "cpu" moves them to host RAM (a GPU
whose memory does not hold them); "disk" writes them as raw bytes to anonymous temporary files (a CPU,
whose RAM is the budget). A file is already unlinked when it is made (tempfile.TemporaryFile), so nothing
stays on disk whatever ends the process; each sync point's windows go to a fresh file, and a file is closed,
its space freed, once every window in it has been read back: at most two generations are on disk at once.
Files go to TMPDIR (Python's tempfile) unless a folder is given.
"""
from __future__ import annotations

import shutil
import tempfile

import numpy as np
import torch

PLACES = ("device", "cpu", "disk")
DISK_GENERATIONS = 2  # files on disk at once (one being read back, one being written): the disk need is this x parked


class _File:
    def __init__(self, folder: str | None):
        self.handle = tempfile.TemporaryFile(prefix="dreamforge-vae-", dir=folder)
        self.size = 0
        self.live = 0
        self.read_from = False


class ParkedStore:
    def __init__(self, where: str, device: torch.device, folder: str | None = None):
        if where not in PLACES:
            raise ValueError(f"where must be one of {PLACES}; got {where!r}")
        self.where, self.device, self.folder = where, device, folder
        self._held: dict = {}  # key -> tensor, or (file, offset, shape, dtype) on disk
        self._writing: _File | None = None
        self.bytes = 0
        self.peak_bytes = 0

    def __enter__(self) -> "ParkedStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def put(self, key, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.where == "device":
            self._held[key] = tensor
        elif self.where == "cpu":
            self._held[key] = tensor.to("cpu")
        else:
            if self._writing is None or self._writing.read_from:
                self._writing = _File(self.folder)
            f = self._writing
            f.handle.seek(f.size)
            # raw bytes (any dtype, bfloat16 included): no pickling, no second copy
            tensor.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy().tofile(f.handle)
            self._held[key] = (f, f.size, tuple(tensor.shape), tensor.dtype)
            f.size += size
            f.live += 1
        self.bytes += size
        self.peak_bytes = max(self.peak_bytes, self.bytes)

    def take(self, key) -> torch.Tensor | None:
        held = self._held.pop(key, None)
        if held is None:
            return None
        if isinstance(held, tuple):
            f, offset, shape, dtype = held
            f.read_from = True
            f.handle.seek(offset)
            count = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
            tensor = torch.from_numpy(np.fromfile(f.handle, dtype=np.uint8, count=count)).view(dtype).reshape(shape)
            f.live -= 1
            if f.live == 0:
                f.handle.close()  # every window in it has been read back: its space is freed
        else:
            tensor = held
        self.bytes -= tensor.numel() * tensor.element_size()
        return tensor.to(self.device)

    def close(self) -> None:
        for held in self._held.values():
            if isinstance(held, tuple):
                held[0].handle.close()
        self._held.clear()
        self._writing = None
        self.bytes = 0


def disk_free(folder: str | None = None) -> int:
    """Free bytes where a disk store would write."""
    return shutil.disk_usage(folder or tempfile.gettempdir()).free
