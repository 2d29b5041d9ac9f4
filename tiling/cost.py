"""Which exact tile plan is fastest: a per-architecture cost model (per call, per pixel, blending, memory).

A plan with n tiles of w x h windows (each read with `context` px of real image around its core) costs

    seconds = ceil(n / tiles_per_call) * per_call + n * batch * w * h * per_pixel
              + (out_pixels * blend_per_pixel  if n > 1)

and needs `tiles_per_call * batch * w * h * bytes_per_pixel` of activation memory (bytes_per_pixel from
the backend's capabilities; on the CPU times CPU_REUSE_FACTOR while runtime/cpu_allocator.py keeps freed
blocks). Context is the price of tiling: every extra tile re-reads 2 * context px on each axis, so a
plan with fewer, larger windows wins unless per-call or memory costs say otherwise. `choose_plan` scores
every distinct plan whose windows fit the budget and returns the cheapest; no fixed tile size is assumed.
Given `reuse_factor` it also scores each plan without heap reuse (less memory, REUSE_OFF_SLOWDOWN x the
time), so a memory-tight CPU runs one tile without reuse rather than tiles that re-read their context.
Where each constant comes from: docs/speed.md ("Where every constant comes from").

CPU_COSTS holds per-pixel costs of whole quiet passes on a 2-core CPU and a per-call cost of a few small
windows; on the CPU per_pixel dominates, so the choice is one tile when it fits, else the plan reading the
fewest pixels. Only the ratios matter (per_call : per_pixel : blend). Each constant's measurement and how to
refit them on another machine (`benchmarks/gpu_suite.py --calibrate`, or `calibrate()`): docs/speed.md.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from .memory import TILE_STEP
from .plan import TilePlan, plan_tiles

CPU_REUSE_FACTOR = 2.0  # heap reuse keeps freed blocks: peak RSS above the start 1.95-2.0x of a default pass (docs/speed.md)
# A pass without heap reuse is this much slower per pixel (page faults): the lowest speed-up measured on the
# CPU (1.35-1.49x, Compact and RRDB, docs/benchmarks.md). Low on purpose: an error here only moves the
# rare memory-tight choice between "one tile, reuse off" and "tiles, reuse on", never the output.
REUSE_OFF_SLOWDOWN = 1.35
MIN_TILE = 64


@dataclass(frozen=True)
class ArchCost:
    per_call: float  # seconds per model call (dispatch, thread wake-up; kernel launches on a GPU)
    per_pixel: float  # seconds per window input pixel per image
    blend_per_pixel: float = 2.0e-8  # seconds per output pixel to weight and add a tile into the canvas


# Per-pixel costs of quiet whole passes on a 2-core CPU (docs/speed.md).
CPU_COSTS = {
    "Compact": ArchCost(per_call=0.02, per_pixel=1.2e-5),
    "ESRGAN": ArchCost(per_call=0.05, per_pixel=3.3e-4),  # RealESRGAN_x4plus, quiet: flat over 64-320 px windows
}
# Placeholders of the right order, not measured (docs/speed.md): per-call latency dominates small tiles on a GPU.
CUDA_COSTS = {
    "Compact": ArchCost(per_call=0.002, per_pixel=2.0e-9, blend_per_pixel=1.0e-10),
    "ESRGAN": ArchCost(per_call=0.005, per_pixel=4.0e-8, blend_per_pixel=1.0e-10),
}


def costs_for(arch: str, device: torch.device | str, bytes_per_pixel: float) -> ArchCost:
    """The table entry for `arch` on `device`; unknown architectures scale ESRGAN's by their memory per pixel."""
    table = CUDA_COSTS if torch.device(device).type == "cuda" else CPU_COSTS
    if arch in table:
        return table[arch]
    base = table["ESRGAN"]
    # Activation memory per pixel tracks width x depth, a fair proxy for work per pixel of a conv net.
    return ArchCost(base.per_call, base.per_pixel * max(bytes_per_pixel, 1.0) / ESRGAN_BYTES_PER_PIXEL,
                    base.blend_per_pixel)


ESRGAN_BYTES_PER_PIXEL = 12288.0  # capabilities.bytes_per_pixel of RealESRGAN_x4plus (fp32)


MAX_TILES_PER_CALL = 8  # GPU: equal windows batched per model call when memory allows


def arch_of(upscaler) -> str:
    """spandrel's architecture id of a GAN upscaler ("" for anything else)."""
    descriptor = getattr(upscaler, "descriptor", None)
    return getattr(getattr(descriptor, "architecture", None), "id", "") or ""


def max_tiles_per_call(device: torch.device, per_tile=None) -> int:
    """Batch windows only on a GPU (on the CPU a bigger batch is no faster) and only with one function
    for every tile (per-tile prompts make each call different)."""
    return MAX_TILES_PER_CALL if device.type == "cuda" and per_tile is None else 1


def memory_factor(device: torch.device) -> float:
    """How much more than the model's own peak a pass holds: the CPU heap keeps freed blocks to reuse."""
    from ..runtime.cpu_allocator import status

    return CPU_REUSE_FACTOR if device.type == "cpu" and status().active else 1.0


@dataclass(frozen=True)
class PlanChoice:
    tile: int  # what to hand run_tiled (0: one tile)
    plan: TilePlan
    seconds: float  # predicted
    memory: int  # predicted activation bytes per call
    tiles_per_call: int = 1
    reuse: bool = True  # run with CPU heap reuse (False: the plan fits only without its extra memory)


def plan_seconds(plan: TilePlan, cost: ArchCost, batch: int, scale: int, tiles_per_call: int = 1) -> float:
    window_px = plan.rows.window * plan.cols.window
    calls = math.ceil(plan.count / max(1, tiles_per_call))
    seconds = calls * cost.per_call + plan.count * batch * window_px * cost.per_pixel
    if not plan.untiled:
        seconds += plan.rows.length * plan.cols.length * scale * scale * batch * cost.blend_per_pixel
    return seconds


def plan_memory(plan: TilePlan, bytes_per_pixel: float, batch: int, tiles_per_call: int = 1) -> int:
    return int(plan.rows.window * plan.cols.window * bytes_per_pixel * batch * tiles_per_call)


def candidate_tiles(height: int, width: int) -> Iterable[int]:
    """0 (one tile), then every multiple of TILE_STEP from the longer side down to MIN_TILE."""
    yield 0
    yield from range((max(height, width) // TILE_STEP) * TILE_STEP, MIN_TILE - 1, -TILE_STEP)


def choose_plan(height: int, width: int, *, batch: int, scale: int, context: int, overlap: int,
                bytes_per_pixel: float, budget: int, cost: ArchCost, multiple: int = 1, minimum: int = 0,
                square: bool = False, max_tiles_per_call: int = 1, reuse_factor: float = 1.0) -> PlanChoice:
    """The cheapest plan (by `cost`) whose activations fit `budget`; the smallest one when none fits
    (the out-of-memory retry takes it from there).

    `reuse_factor` (memory_factor(device): > 1 while CPU heap reuse is on) scores every plan twice: with
    reuse (memory x reuse_factor) and without it (its own memory, REUSE_OFF_SLOWDOWN x the seconds), so an
    image that fits untiled only without reuse runs that way instead of in tiles that re-read context."""
    best: PlanChoice | None = None
    smallest: PlanChoice | None = None
    for choice in _candidates(height, width, batch, scale, context, overlap, bytes_per_pixel, budget, cost,
                              multiple, minimum, square, max_tiles_per_call, reuse_factor):
        if smallest is None or choice.memory < smallest.memory:
            smallest = choice
        if choice.memory <= budget and (best is None or choice.seconds < best.seconds):
            best = choice
    return best or smallest


def _candidates(height, width, batch, scale, context, overlap, bytes_per_pixel, budget, cost, multiple, minimum,
                square, max_tiles_per_call, reuse_factor) -> Iterable[PlanChoice]:
    """Every distinct plan, with reuse (memory x reuse_factor) and, when that factor is > 1, without."""
    modes = [(True, bytes_per_pixel * reuse_factor, 1.0)]
    if reuse_factor > 1.0:
        modes.append((False, bytes_per_pixel, REUSE_OFF_SLOWDOWN))
    seen: set = set()
    for tile in candidate_tiles(height, width):
        plan = plan_tiles(height, width, tile, overlap, context, multiple, minimum, square)
        key = (plan.rows.tile, plan.cols.tile, plan.rows.window, plan.cols.window, plan.count)
        if key in seen:
            continue
        seen.add(key)
        for reuse, bpp, slowdown in modes:
            per_call = min(max(1, max_tiles_per_call), plan.count)
            while per_call > 1 and plan_memory(plan, bpp, batch, per_call) > budget:
                per_call //= 2
            yield PlanChoice(tile, plan, slowdown * plan_seconds(plan, cost, batch, scale, per_call),
                             plan_memory(plan, bpp, batch, per_call), per_call, reuse)


# ----------------------------------------------------------------------------------- calibration

def calibrate(fn: Callable[[torch.Tensor], torch.Tensor], device: torch.device, dtype: torch.dtype = torch.float32,
              sides: tuple[int, ...] = (96, 192, 384), repeats: int = 2, channels: int = 3) -> ArchCost:
    """Fit per_call + per_pixel * px to the best of `repeats` timed calls at each window side."""
    from ..runtime.cpu_allocator import reuse

    xs, ys = [], []
    with reuse(device):
        fn(torch.rand(1, channels, sides[0], sides[0], device=device, dtype=dtype))  # warm-up
        for side in sides:
            x = torch.rand(1, channels, side, side, device=device, dtype=dtype).contiguous(
                memory_format=torch.channels_last)
            best = math.inf
            for _ in range(repeats):
                _sync(device)
                t0 = time.perf_counter()
                fn(x)
                _sync(device)
                best = min(best, time.perf_counter() - t0)
            xs.append(side * side)
            ys.append(best)
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    slope = sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / max(1e-12, sum((a - mx) ** 2 for a in xs))
    return ArchCost(per_call=max(0.0, my - slope * mx), per_pixel=max(slope, 1e-12))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)

