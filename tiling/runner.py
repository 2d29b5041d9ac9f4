"""Run a model over an image tile by tile and blend the tiles into one seamless output.

Memory: the float32 output canvas plus one tile's window in flight; the blend weights are
separable 1-D feathers (no full-size weight map). When the plan is a single tile the model's
output is returned as it is, with no canvas at all.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .plan import TilePlan, plan_tiles
from .retry import allocator_message, free_cache, is_out_of_memory, shrink_plan_on_oom

TileFn = Callable[[torch.Tensor], torch.Tensor]  # BCHW window on the device -> BCHW at `scale`
# (plan, row, col) -> the function for that tile (e.g. one conditioned on that tile's own prompt)
PerTileFn = Callable[[TilePlan, int, int], TileFn]


@dataclass
class RunHooks:
    """What the caller's environment supplies; every field is optional (plain torch defaults)."""

    progress: Callable[[int, int], None] | None = None  # (done, total) after each tile
    check_interrupt: Callable[[], None] | None = None  # raises to stop between tiles
    oom_errors: tuple[type[BaseException], ...] = ()  # extra exception types meaning out-of-memory
    free_bytes: Callable[[torch.device], int] | None = None  # free memory as the host manager sees it
    prepare: Callable[[int], None] | None = None  # make room for N bytes of activations (load the model)
    offload_device: torch.device | None = None  # where networks not in use wait (host's choice; default CPU)


@dataclass
class TiledResult:
    image: torch.Tensor  # B,H,W,C float32
    plan: TilePlan
    retries: list[dict] = field(default_factory=list)


def _window(image: torch.Tensor, plan: TilePlan, r: int, c: int) -> torch.Tensor:
    """B,h,w,C window of tile (r, c): a view when it lies inside the image, else reflected."""
    out = image
    for dim, axis, i in ((1, plan.rows, r), (2, plan.cols, c)):
        start = axis.window_starts[i]
        if start + axis.window <= axis.length:
            out = out.narrow(dim, start, axis.window)
        else:
            out = out.index_select(dim, axis.window_indices(i))
    return out


def _check_shape(y: torch.Tensor, x: torch.Tensor, plan: TilePlan, scale: int) -> None:
    expected = (plan.rows.window * scale, plan.cols.window * scale)
    if tuple(y.shape[-2:]) != expected:
        raise RuntimeError(
            f"the model returned {tuple(y.shape[-2:])} for a {tuple(x.shape[-2:])} input, expected "
            f"{expected} at scale {scale}: its native scale is not what its descriptor says"
        )


def _call_group(fn: TileFn, windows: list[torch.Tensor], per_call: int, retries: list | None,
                hooks: RunHooks) -> tuple[list[torch.Tensor], int]:
    """Run equal windows `per_call` at a time, stacked along the batch; on out-of-memory halve
    `per_call` and retry the group (at most log2(per_call) extra calls). Out of memory with one window
    per call is re-raised for the tile-size retry (tiling/retry.py). Returns outputs and the per_call
    that worked, which the caller keeps for the rest of the plan."""
    while True:
        try:
            outs = []
            for i in range(0, len(windows), per_call):
                chunk = windows[i : i + per_call]
                x = chunk[0] if len(chunk) == 1 else torch.cat(chunk, dim=0)
                outs.extend(fn(x).split(windows[0].shape[0], dim=0))
            return outs, per_call
        except Exception as exc:  # noqa: BLE001 - only out-of-memory is retried here
            if per_call == 1 or not is_out_of_memory(exc, hooks.oom_errors):
                raise
            message = allocator_message(exc)
        free_cache(windows[0].device)
        if retries is not None:
            retries.append({"event": "out_of_memory", "stage": "tile batch", "tiles_per_call": per_call,
                            "retry_tiles_per_call": per_call // 2, "allocator": message})
        per_call //= 2


def run_plan(image: torch.Tensor, fn: TileFn | None, scale: int, plan: TilePlan, device: torch.device,
             dtype: torch.dtype, hooks: RunHooks, per_tile: PerTileFn | None = None, tiles_per_call: int = 1,
             retries: list | None = None) -> torch.Tensor:
    """image: B,H,W,C float (CPU). Returns B,H*scale,W*scale,C_out float32 on the image's device.

    Each tile runs `fn`, or `per_tile(plan, row, col)` when given. With `fn` and tiles_per_call > 1,
    that many equal windows go through the model in one call (fewer launches on a GPU)."""
    batch, height, width, _ = image.shape
    tiles = list(plan.tiles())
    total = len(tiles)
    per_call = 1 if per_tile is not None else max(1, min(tiles_per_call, total))
    canvas = None
    row_w, col_w = plan.blend_weights(scale) if not plan.untiled else (None, None)
    done = 0
    while done < total:
        if hooks.check_interrupt:
            hooks.check_interrupt()
        group = tiles[done : done + per_call]
        windows = [_window(image, plan, r, c).permute(0, 3, 1, 2)  # BCHW view, channels_last strides
                   .to(device=device, dtype=dtype).contiguous(memory_format=torch.channels_last) for r, c in group]
        if per_tile is not None:
            outs = [per_tile(plan, *group[0])(windows[0])]
        else:
            outs, per_call = _call_group(fn, windows, per_call, retries, hooks)
        for (r, c), x, y in zip(group, windows, outs):
            _check_shape(y, x, plan, scale)
            oy = (plan.rows.starts[r] - plan.rows.window_starts[r]) * scale
            ox = (plan.cols.starts[c] - plan.cols.window_starts[c]) * scale
            th, tw = plan.rows.tile * scale, plan.cols.tile * scale
            core = y[:, :, oy : oy + th, ox : ox + tw]
            if plan.untiled:
                out = core.permute(0, 2, 3, 1).to(device=image.device, dtype=torch.float32)
                if hooks.progress:
                    hooks.progress(1, 1)
                return out
            if canvas is None:
                canvas = torch.zeros(batch, height * scale, width * scale, y.shape[1], dtype=torch.float32,
                                     device=image.device)
            weight = torch.outer(row_w[r].to(y.device, torch.float32), col_w[c].to(y.device, torch.float32))
            contribution = (core.float() * weight).permute(0, 2, 3, 1).to(image.device)
            y0, x0 = plan.rows.starts[r] * scale, plan.cols.starts[c] * scale
            canvas[:, y0 : y0 + th, x0 : x0 + tw, :] += contribution
            del core, contribution
        done += len(group)
        del windows, outs
        if hooks.progress:
            hooks.progress(done, total)
    return canvas


def run_tiled(
    image: torch.Tensor,
    fn: TileFn | None,
    scale: int,
    *,
    tile: int,
    overlap: int,
    context: int,
    device: torch.device,
    dtype: torch.dtype,
    multiple: int = 1,
    minimum: int = 0,
    square: bool = False,
    floor: int = 64,
    stage: str = "tiles",
    hooks: RunHooks | None = None,
    per_tile: PerTileFn | None = None,
    tiles_per_call: int = 1,
) -> TiledResult:
    """Tile, run and blend; on out-of-memory retry with smaller tiles while the windows shrink, down to
    `floor` (tiling/retry.py). `tiles_per_call` > 1 batches equal windows per model call; out of memory
    there first halves it (down to 1) before any tile shrinks, so the calls stay bounded."""
    hooks = hooks or RunHooks()
    retries: list[dict] = []
    _, height, width, _ = image.shape

    def plan_for(size: int) -> TilePlan:
        return plan_tiles(height, width, size, overlap, context, multiple, minimum, square)

    def run(plan: TilePlan) -> TiledResult:
        return TiledResult(run_plan(image, fn, scale, plan, device, dtype, hooks, per_tile, tiles_per_call, retries),
                           plan, retries)

    start = min(tile, max(height, width)) if tile > 0 else max(height, width)  # tile 0: one tile
    return shrink_plan_on_oom(plan_for, run, start, floor=min(floor, start), stage=stage, device=device,
                              retries=retries, oom_errors=hooks.oom_errors)
