"""How much memory a tiled run may use, and the largest tile that fits it."""
from __future__ import annotations

from pathlib import Path

import psutil
import torch

# Leave room for the allocator's fragmentation and whatever else the process allocates meanwhile.
BUDGET_FRACTION = 0.6
TILE_STEP = 32  # auto tiles are multiples of this (friendly to every model's size multiple)


def free_bytes(device: torch.device) -> int:
    """Free memory on `device` as torch/psutil see it (outside ComfyUI's memory manager)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    return int(psutil.virtual_memory().available)


CGROUP = "/sys/fs/cgroup"


def host_free_bytes(cgroup: str = CGROUP) -> int:
    """System memory this process may still take: the OS's available memory, or less where a cgroup (v2, a
    container's limit) caps the process below it (psutil sees the host's memory, not the container's)."""
    free = int(psutil.virtual_memory().available)
    try:
        limit = Path(cgroup, "memory.max").read_text().strip()
        used = int(Path(cgroup, "memory.current").read_text().strip())
        stat = dict(line.split() for line in Path(cgroup, "memory.stat").read_text().splitlines() if line.count(" ") == 1)
    except (OSError, ValueError):
        return free
    used -= int(stat.get("inactive_file", 0))  # page cache the kernel reclaims before it kills anything
    if limit.isdigit():
        free = min(free, max(0, int(limit) - used))
    return free


def canvas_bytes(batch: int, height: int, width: int, channels: int, scale: int) -> int:
    return batch * height * scale * width * scale * channels * 4  # float32 output


def choose_tile(
    height: int,
    width: int,
    batch: int,
    bytes_per_pixel: float,
    budget: int,
    context: int,
) -> int:
    """Largest tile whose window's working memory fits `budget`; 0 when the whole image fits.

    `bytes_per_pixel` is the model's working memory per input pixel of one image in the run's
    dtype (activations, not weights).
    """
    per_image_px = max(1.0, bytes_per_pixel * batch)
    if height * width * per_image_px <= budget:
        return 0
    # No budget left (the canvas alone fills it): the smallest tile; out-of-memory retries take it from there.
    side = int((max(0, budget) / per_image_px) ** 0.5) - 2 * context
    side = (side // TILE_STEP) * TILE_STEP
    return max(TILE_STEP, side)
