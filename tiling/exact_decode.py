"""A tiled VAE decode that equals the untiled one, in one pass, under any memory budget.

The decoder runs as a program (decoder_program.py), layer by layer over its windows: between two GroupNorms
one window at a time goes through the window-local steps, then adds the per-channel sums of the region it
owns (the plan's tiles cut at the middle of each overlap, scaled to the layer's resolution) and is parked
(parking.py: on the device when the budget holds every window's activations, else host RAM, else files).
When every window has added its sums, each normalises with the whole image's mean and variance and goes on.
What a window owns is exact when it reads more real context than the decoder's receptive field (measured by
the program's probe), so the statistics and the owned output are the untiled pass's, and the owned regions
are pasted (no blend: nothing to hide). Working memory is one window's; the parked activations are the
untiled pass's live tensors times the plan's window area ratio.

The decoder's middle self-attention is global. With `whole_attention` its input is gathered from every
window's owned region, it runs once over the whole latent and every window takes its part of the result
(also exact); without, each window attends within itself (normalised with the whole image's statistics), an
approximation the caller records. `plan_exact` decides all of it from the budget, before anything runs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from ..runtime.dtypes import itemsize
from .decoder_program import ATTENTION, NORM, NotAProgram, Step, probe, run_local
from .group_norm import channel_sums, group_stats, normalise
from .memory import BUDGET_FRACTION, host_free_bytes
from .parking import DISK_GENERATIONS, ParkedStore, disk_free
from .plan import AxisPlan, TilePlan, plan_tiles

ATTENTION_SHARE = 0.1  # whole-latent attention when it costs at most this share of the decode more than windows
DISK_SHARE = 0.9  # of the free disk a disk store may fill
MAX_EXTRA_WORK = 2.0  # exact, when it decodes at most this many times the pixels of the statistics pass it replaces


def decode_flops_per_px(decode: Callable[[torch.Tensor], torch.Tensor], channels: int, device, dtype) -> float:
    """FLOPs of `decode` per latent pixel, counted by torch on an 8 x 8 latent (where attention is negligible)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        decode(torch.zeros(1, channels, 8, 8, device=device, dtype=dtype))
    return counter.get_total_flops() / 64


def whole_attention_pays(plan: TilePlan, flops_per_px: float, channels: int) -> bool:
    """Whether attention over the whole latent costs little against the decode (QK^T and AV: 4 N^2 C FLOPs),
    beyond what the windows' own attention costs anyway."""
    def attention(tokens: int) -> float:
        return 4.0 * tokens * tokens * channels

    pixels = plan.rows.length * plan.cols.length
    extra = attention(pixels) - plan.count * attention(plan.rows.window * plan.cols.window)
    return extra <= ATTENTION_SHARE * flops_per_px * pixels


def owned(axis: AxisPlan) -> list[tuple[int, int]]:
    """Per tile, the [start, end) it owns in image coordinates: cut at the middle of each overlap."""
    cuts = [0] + [(axis.starts[i] + axis.starts[i - 1] + axis.tile) // 2 for i in range(1, axis.count)] + [axis.length]
    return list(zip(cuts, cuts[1:]))


@dataclass(frozen=True)
class ExactDecode:
    """How a tiled decode runs exactly: its program, window plan and where windows wait."""

    program: list[Step]
    tile: int  # latent px (what plan_tiles takes)
    pad: int  # latent px of context: the receptive field, less half the overlap
    parked: str  # "device", "cpu" or "disk" (parking.py)
    parked_bytes: int  # planned: every window's activation (+ residual) at the fullest GroupNorm
    whole_attention: bool


def plan_exact(build: Callable[[], list[Step]], decode: Callable[[torch.Tensor], torch.Tensor], latents: torch.Tensor,
               tile: int, overlap: int, pad: int, per_px: float, budget: float, device: torch.device,
               dtype: torch.dtype, host_free: Callable[[], int] | None = None,
               disk: Callable[[], int] | None = None) -> tuple[ExactDecode | None, str]:
    """(the exact decode for tiles of `tile` latent px, or None; why not).

    `build` makes the decoder's program (raising NotAProgram for a decoder it does not know); `decode` is the
    decoder itself on a window, what the program must reproduce. Each window reads the context the receptive
    field needs (at least `pad`); where that window would not fit the budget, the tile shrinks so that the
    window stays tile + 2 `pad`. `per_px`: the decoder's working memory per latent px."""
    try:
        program = build()
        probed = probe(program, decode, latents.shape[1], device, dtype)
    except NotAProgram as exc:
        return None, f"the decoder cannot run layer by layer ({exc})"
    height, width = latents.shape[-2:]
    need = max(pad, math.ceil(probed.receptive_field) - overlap // 2)
    tile_asked = tile
    if per_px * (tile + 2 * need) ** 2 > budget:  # the wider context would overflow the window: same window size
        tile = max(overlap + 1, tile - 2 * (need - pad))
    plan = plan_tiles(height, width, tile, overlap, need)
    if plan.untiled:
        return None, (f"the decoder's receptive field ({probed.receptive_field} latent px each way) spans the whole "
                      f"{height}x{width} latent: an exact decode here is the untiled one, which does not fit")
    window_px = plan.rows.window * plan.cols.window
    # what the statistics pass would decode instead: its (budget-sized) whole pass, then windows with `pad`
    usual = plan_tiles(height, width, tile_asked, overlap, pad)
    usual_px = min(height * width, budget / per_px) + usual.count * usual.rows.window * usual.cols.window
    if plan.count * window_px > MAX_EXTRA_WORK * usual_px:
        return None, (f"windows of {plan.rows.window}x{plan.cols.window} latent px reading the receptive field's "
                      f"{need} px of context would decode {plan.count * window_px / (height * width):.1f}x the "
                      f"latent, over {MAX_EXTRA_WORK}x the statistics pass's work")
    parked = int(probed.parked_per_px * latents.shape[0] * window_px * plan.count)
    working = per_px * window_px
    if parked + working <= budget:
        where = "device"
    elif device.type != "cpu" and parked <= (host_free or host_free_bytes)() * BUDGET_FRACTION:
        where = "cpu"
    elif parked * DISK_GENERATIONS <= (disk or disk_free)() * DISK_SHARE:
        where = "disk"
    else:
        return None, f"its {parked / 2**30:.1f} GiB of parked activations fit neither memory nor the temporary disk"
    whole = False
    attention = next((s for s in program if s.kind == ATTENTION), None)
    if attention is not None:
        gathered = 3 * latents.shape[0] * attention.width * height * width * itemsize(dtype)
        room = budget - (parked if where == "device" else 0)
        whole = gathered <= room and whole_attention_pays(
            plan, decode_flops_per_px(decode, latents.shape[1], device, dtype), attention.width)
    return ExactDecode(program, tile, need, where, parked, whole), ""


def owned_box(plan: TilePlan, tile: tuple[int, int], h: int, w: int) -> tuple[int, slice, slice]:
    """(px per latent px, rows, cols) of what tile (r, c) owns inside its window, at a layer whose window is h x w."""
    f = h // plan.rows.window
    if f * plan.rows.window != h or w != f * plan.cols.window:
        raise RuntimeError(f"a {h}x{w} activation is not a whole multiple of the {plan.rows.window}x"
                           f"{plan.cols.window} window: this network cannot be tiled exactly")
    r, c = tile
    (y0, y1), (x0, x1) = owned(plan.rows)[r], owned(plan.cols)[c]
    oy, ox = plan.rows.window_starts[r], plan.cols.window_starts[c]
    return f, slice((y0 - oy) * f, (y1 - oy) * f), slice((x0 - ox) * f, (x1 - ox) * f)


def _segments(program: list[Step]) -> list[tuple[list[Step], Step | None]]:
    """The program cut at its sync points: (window-local steps, the GroupNorm or attention ending them)."""
    segments, run = [], []
    for step in program:
        if step.kind in (NORM, ATTENTION):
            segments.append((run, step))
            run = []
        else:
            run.append(step)
    return segments + [(run, None)]


def _windowed_attention(step: Step, mean: torch.Tensor, var: torch.Tensor) -> Callable:
    def begin(tile, x, attn=step.module, norm=step.norm):
        norm.forward = lambda h: normalise(norm, h, mean, var)  # removed below: the module is shared
        try:
            return attn(x)
        finally:
            del norm.forward
    return begin


def decode_exact(program: list[Step], latents: torch.Tensor, plan: TilePlan, scale: int, *, device: torch.device,
                 dtype: torch.dtype, store: ParkedStore, whole_attention: bool = False,
                 check_interrupt: Callable[[], None] | None = None) -> torch.Tensor:
    """latents B,C,h,w -> B,h*scale,w*scale,C' float32, equal to the program over the whole latent."""
    tiles = list(plan.tiles())
    batch, _, height, width = latents.shape
    begin: Callable | None = None  # per window, first thing in a segment: what the last sync point decided
    residual_is_x: set[tuple[int, int]] = set()  # windows whose parked residual is their parked activation
    out: torch.Tensor | None = None
    for steps, sync in _segments(program):
        sums: list | None = None
        gathered: torch.Tensor | None = None
        for tile in tiles:
            if check_interrupt:
                check_interrupt()
            r, c = tile
            if begin is None:
                x = latents[..., plan.rows.window_starts[r]:plan.rows.window_starts[r] + plan.rows.window,
                            plan.cols.window_starts[c]:plan.cols.window_starts[c] + plan.cols.window]
                x, residual = x.to(device=device, dtype=dtype).contiguous(), None
            else:
                raw = store.take((r, c, "x"))
                residual = raw if tile in residual_is_x else store.take((r, c, "residual"))
                x = begin(tile, raw)
                raw = None
            for step in steps:
                x, residual = run_local(step, x, residual)
            f, ys, xs = owned_box(plan, tile, *x.shape[-2:])
            part = x[..., ys, xs]
            (y0, y1), (x0, x1) = owned(plan.rows)[r], owned(plan.cols)[c]
            if sync is None:  # the output: pasted
                if out is None:
                    out = torch.empty((batch, x.shape[1], height * f, width * f), dtype=torch.float32)
                out[..., y0 * f:y1 * f, x0 * f:x1 * f] = part.float().cpu()
                continue
            parks_x = not (sync.kind == ATTENTION and whole_attention)
            if not parks_x:
                if gathered is None:
                    gathered = x.new_empty((batch, x.shape[1], height * f, width * f))
                gathered[..., y0 * f:y1 * f, x0 * f:x1 * f] = part
            else:
                s1, s2, n = channel_sums(part)
                sums = [s1, s2, n] if sums is None else [sums[0] + s1, sums[1] + s2, sums[2] + n]
                store.put((r, c, "x"), x)
            if residual is x and parks_x:  # a residual block's input at its first GroupNorm: parked once
                residual_is_x.add(tile)
            else:
                residual_is_x.discard(tile)
                if residual is not None:
                    store.put((r, c, "residual"), residual)
            x = residual = part = None
        if sync is None:
            break
        if sync.kind == NORM:
            mean, var = group_stats(sync.module, *sums)
            begin = lambda tile, x, norm=sync.module, mean=mean, var=var: normalise(norm, x, mean, var)  # noqa: E731
        elif whole_attention:
            attended = sync.module(gathered)  # its own GroupNorm over the whole latent: the untiled statistics
            gathered = None

            def begin(tile, x, attended=attended):
                r, c = tile
                f = attended.shape[-1] // width
                oy, ox = plan.rows.window_starts[r] * f, plan.cols.window_starts[c] * f
                return attended[..., oy:oy + plan.rows.window * f, ox:ox + plan.cols.window * f].contiguous()
        else:
            begin = _windowed_attention(sync, *group_stats(sync.norm, *sums))
    scale_seen = out.shape[-1] // width
    if scale_seen != scale:
        raise RuntimeError(f"the decoder scaled by {scale_seen}, not the {scale} the caller planned")
    return out.permute(0, 2, 3, 1)
