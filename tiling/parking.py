"""Where a layered decode's activations wait between GroupNorms: whole canvases on the device, in host RAM, or on disk.

A canvas holds one whole activation (B,C,H,W); each window writes the region it owns and reads the region it
needs (its own plus a few pixels of its neighbours'). "device" keeps it where the compute runs (the budget holds
it); "cpu" in host RAM (a GPU whose memory does not); "disk" in an anonymous temporary file (a CPU, whose RAM is
the budget), laid out B,H,W,C so that a window's row is one read or write. The file is already unlinked when it
is made (tempfile.TemporaryFile), so nothing stays on disk whatever ends the process, and its space is freed when
the canvas closes. Files go to TMPDIR (Python's tempfile) unless a folder is given.
"""
from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
import torch

PLACES = ("device", "cpu", "disk")


class Canvas:
    def __init__(self, store: "ParkedStore", shape: tuple[int, ...], dtype: torch.dtype,
                 tensor: torch.Tensor | None = None):
        self.store, self.shape, self.dtype = store, tuple(shape), dtype
        self.nbytes = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
        self._tensor: torch.Tensor | None = tensor  # given: held as it is (a device store's, no copy)
        self._file = None
        if tensor is None and store.where == "disk":
            self._file = tempfile.TemporaryFile(prefix="dreamforge-vae-", dir=store.folder)
            os.ftruncate(self._file.fileno(), self.nbytes)  # sparse: the disk fills as windows write
        elif tensor is None:
            self._tensor = torch.empty(shape, dtype=dtype, device=store.device if store.where == "device" else "cpu")

    def _rows(self, ys: slice, xs: slice):
        """(batch, row in the box, byte offset in the file) of each of the box's rows (B,H,W,C on disk)."""
        b, c, h, w = self.shape
        item = self.nbytes // (b * c * h * w)
        for n in range(b):
            for y in range(ys.start, ys.stop):
                yield n, y - ys.start, ((n * h + y) * w + xs.start) * c * item

    def write(self, ys: slice, xs: slice, part: torch.Tensor) -> None:
        """Store `part` (B,C,rows,cols) at rows `ys`, cols `xs`."""
        if self._tensor is not None:
            self._tensor[..., ys, xs] = part
            return
        rows = part.detach().to("cpu").permute(0, 2, 3, 1).contiguous()
        raw = rows.view(rows.shape[0], rows.shape[1], -1).view(torch.uint8).numpy()  # any dtype: raw bytes
        fd = self._file.fileno()
        for n, i, offset in self._rows(ys, xs):
            if os.pwrite(fd, raw[n, i], offset) != raw.shape[-1]:
                raise OSError(28, "a short write to the parked activations' file")

    def read(self, ys: slice, xs: slice) -> torch.Tensor:
        """The box at rows `ys`, cols `xs` as a B,C,rows,cols tensor on the store's device."""
        if self._tensor is not None:
            return self._tensor[..., ys, xs].to(self.store.device).contiguous()
        b, c = self.shape[:2]
        h, w = ys.stop - ys.start, xs.stop - xs.start
        item = self.nbytes // (b * c * self.shape[2] * self.shape[3])
        raw = np.empty((b, h, w * c * item), dtype=np.uint8)
        fd = self._file.fileno()
        for n, i, offset in self._rows(ys, xs):
            if os.preadv(fd, [raw[n, i]], offset) != raw.shape[-1]:
                raise OSError(5, "a short read from the parked activations' file")
        rows = torch.from_numpy(raw).view(self.dtype).reshape(b, h, w, c)
        return rows.permute(0, 3, 1, 2).to(self.store.device).contiguous()

    def whole(self) -> torch.Tensor:
        return self.read(slice(0, self.shape[2]), slice(0, self.shape[3]))

    def close(self) -> None:
        if self in self.store._open:
            self.store._open.remove(self)
            self.store.bytes -= self.nbytes
        self._tensor = None
        if self._file is not None:
            self._file.close()  # its space is freed
            self._file = None


class ParkedStore:
    """The canvases of one decode: made with `canvas`, every one still open closed when the decode ends."""

    def __init__(self, where: str, device: torch.device, folder: str | None = None):
        if where not in PLACES:
            raise ValueError(f"where must be one of {PLACES}; got {where!r}")
        self.where, self.device, self.folder = where, device, folder
        self._open: list[Canvas] = []
        self.bytes = 0
        self.peak_bytes = 0

    def __enter__(self) -> "ParkedStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def canvas(self, shape: tuple[int, ...], dtype: torch.dtype, tensor: torch.Tensor | None = None) -> Canvas:
        made = Canvas(self, shape, dtype, tensor)
        self._open.append(made)
        self.bytes += made.nbytes
        self.peak_bytes = max(self.peak_bytes, self.bytes)
        return made

    def canvas_of(self, tensor: torch.Tensor) -> Canvas:
        """A canvas holding `tensor` (on the device: the tensor itself, no copy)."""
        if self.where == "device":
            return self.canvas(tuple(tensor.shape), tensor.dtype, tensor)
        made = self.canvas(tuple(tensor.shape), tensor.dtype)
        made.write(slice(0, tensor.shape[2]), slice(0, tensor.shape[3]), tensor)
        return made

    def close(self) -> None:
        for canvas in list(self._open):
            canvas.close()


def disk_free(folder: str | None = None) -> int:
    """Free bytes where a disk store would write."""
    return shutil.disk_usage(folder or tempfile.gettempdir()).free
