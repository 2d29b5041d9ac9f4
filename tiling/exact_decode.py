"""A tiled VAE decode that equals the untiled one, in one pass, under any memory budget.

The decoder runs as a program (decoder_program.py) cut at its sync points (the GroupNorms, the middle
attention) into segments of window-local steps. Each segment's output is one whole activation, parked as a
canvas (parking.py: on the device when the budget holds it, else host RAM, else a file), and the segment runs
window by window: a window reads from the previous canvas the region it owns (the plan's tiles, cut at the
middle of their overlaps, at the canvas's resolution) plus the segment's halo, the pixel or two its
convolutions reach (measured by the program's probe), so what it owns comes out as the untiled pass computes
it. It writes that into the next canvas and adds its per-channel sums; once every window has, the next segment
normalises with the whole image's mean and variance as it reads. The extra work is the halos', the memory one
window's working set plus the canvases (the untiled pass's live activations), wherever they are parked.

The decoder's middle self-attention is global. With `whole_attention` it runs once over the whole canvas (also
exact); without, each window attends within what it owns plus the plan's context (normalised with the whole
image's statistics), an approximation the caller records. `plan_exact` decides all of it from the budget,
before anything runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..runtime.dtypes import itemsize
from .decoder_program import ATTENTION, NORM, NotAProgram, Step, probe, run_local
from .group_norm import channel_sums, group_stats, normalise
from .memory import BUDGET_FRACTION, host_free_bytes
from .parking import Canvas, ParkedStore, disk_free
from .plan import AxisPlan, TilePlan, plan_tiles

ATTENTION_SHARE = 0.1  # whole-latent attention when it costs at most this share of the decode more than windows
DISK_SHARE = 0.9  # of the free disk a disk store may fill


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
    """How a tiled decode runs exactly: its program, window plan and where the canvases wait."""

    program: list[Step]
    halos: tuple[int, ...]  # per segment of the program: px of context at its input's resolution (the probe's)
    tile: int  # latent px (what plan_tiles takes)
    pad: int  # latent px of context a windowed attention reads around what it owns
    parked: str  # "device", "cpu" or "disk" (parking.py)
    parked_bytes: int  # planned: the canvases open at once at the fullest segment
    whole_attention: bool

    def plan(self, height: int, width: int) -> TilePlan:
        return plan_tiles(height, width, self.tile, 0, self.pad)


def plan_exact(build: Callable[[], list[Step]], decode: Callable[[torch.Tensor], torch.Tensor], latents: torch.Tensor,
               tile: int, pad: int, per_px: float, budget: float, device: torch.device, dtype: torch.dtype,
               host_free: Callable[[], int] | None = None,
               disk: Callable[[], int] | None = None) -> tuple[ExactDecode | None, str]:
    """(the exact decode for tiles of `tile` latent px, or None; why not).

    `build` makes the decoder's program (raising NotAProgram for a decoder it does not know); `decode` is the
    decoder itself on a window, what the program must reproduce. `pad`: the latent px of context the caller
    sized its windows with (a windowed attention reads that much); `per_px`: the decoder's working memory per
    latent px of a window."""
    try:
        program = build()
        probed = probe(program, decode, latents.shape[1], device, dtype)
    except NotAProgram as exc:
        return None, f"the decoder cannot run layer by layer ({exc})"
    batch, _, height, width = latents.shape
    plan = plan_tiles(height, width, tile, 0, pad)
    if plan.untiled:
        return None, f"one window covers the {height}x{width} latent: the decode is the untiled one"
    parked = int(probed.parked_per_px * batch * height * width)
    working = per_px * plan.rows.window * plan.cols.window
    if parked + working <= budget:
        where = "device"
    elif device.type != "cpu" and parked <= (host_free or host_free_bytes)() * BUDGET_FRACTION:
        where = "cpu"
    elif parked <= (disk or disk_free)() * DISK_SHARE:
        where = "disk"
    else:
        return None, f"its {parked / 2**30:.1f} GiB of parked activations fit neither memory nor the temporary disk"
    whole = False
    attention = next((s for s in program if s.kind == ATTENTION), None)
    if attention is not None:
        gathered = 3 * batch * attention.width * height * width * itemsize(dtype)
        room = budget - (parked if where == "device" else 0)
        whole = gathered <= room and whole_attention_pays(
            plan, decode_flops_per_px(decode, latents.shape[1], device, dtype), attention.width)
    return ExactDecode(program, probed.halos, tile, pad, where, parked, whole), ""


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
    def begin(x, attn=step.module, norm=step.norm):
        norm.forward = lambda h: normalise(norm, h, mean, var)  # removed below: the module is shared
        try:
            return attn(x)
        finally:
            del norm.forward
    return begin


def _around(span: tuple[int, int], level: int, reach: int, length: int) -> slice:
    """An owned latent span at `level` px per latent px, widened by `reach` px and kept inside the image."""
    return slice(max(0, span[0] * level - reach), min(length * level, span[1] * level + reach))


def _scaled(t: torch.Tensor, ys: slice, xs: slice) -> int:
    """The factor by which `t` (a window's activation) has grown from the box it was read as."""
    g = t.shape[-1] // (xs.stop - xs.start)
    if t.shape[-1] != g * (xs.stop - xs.start) or t.shape[-2] != g * (ys.stop - ys.start):
        raise RuntimeError(f"a {t.shape[-2]}x{t.shape[-1]} activation from a {ys.stop - ys.start}x"
                           f"{xs.stop - xs.start} window is not a whole multiple of it: it cannot be tiled exactly")
    return g


def decode_exact(program: list[Step], halos: tuple[int, ...], latents: torch.Tensor, plan: TilePlan, scale: int, *,
                 device: torch.device, dtype: torch.dtype, store: ParkedStore, whole_attention: bool = False,
                 check_interrupt: Callable[[], None] | None = None) -> torch.Tensor:
    """latents B,C,h,w -> B,h*scale,w*scale,C' float32, equal to the program over the whole latent."""
    segments = _segments(program)
    if len(halos) != len(segments):
        raise ValueError(f"{len(halos)} halos for a program of {len(segments)} segments")
    batch, _, height, width = latents.shape
    rows, cols = owned(plan.rows), owned(plan.cols)
    source: Canvas | None = None  # what this segment reads (None: the latents)
    residual_at: Canvas | None = None  # where the live residual waits
    begin: Callable | None = None  # first thing on each window: what the last sync point decided
    attend = 0  # latent px of context the windowed attention at the start of this segment reads
    out: torch.Tensor | None = None
    for (steps, sync), halo in zip(segments, halos):
        level = 1 if source is None else source.shape[-1] // width  # px per latent px of this segment's input
        target = own_residual = sums = None
        kept = "none"
        for r, c in plan.tiles():
            if check_interrupt:
                check_interrupt()
            ys = _around(rows[r], level, halo + attend * level, height)
            xs = _around(cols[c], level, halo + attend * level, width)
            if source is None:
                x = latents[..., ys, xs].to(device=device, dtype=dtype).contiguous()
            else:
                x = source.read(ys, xs)
            carried = None if residual_at is None else x if residual_at is source else residual_at.read(ys, xs)
            residual = carried
            if begin is not None:
                x = begin(x)
            for step in steps:
                x, residual = run_local(step, x, residual)

            def mine(t: torch.Tensor) -> tuple[torch.Tensor, slice, slice, int]:  # what this window owns of t
                g = _scaled(t, ys, xs)
                f = level * g
                (y0, y1), (x0, x1) = rows[r], cols[c]
                part = t[..., y0 * f - ys.start * g:y1 * f - ys.start * g, x0 * f - xs.start * g:x1 * f - xs.start * g]
                return part, slice(y0 * f, y1 * f), slice(x0 * f, x1 * f), f

            part, oy, ox, f = mine(x)
            if sync is None:  # the output: pasted
                if out is None:
                    out = torch.empty((batch, x.shape[1], height * f, width * f), dtype=torch.float32)
                out[..., oy, ox] = part.float().cpu()
                continue
            if target is None:
                target = store.canvas((batch, x.shape[1], height * f, width * f), x.dtype)
            target.write(oy, ox, part)
            if sync.kind == NORM or not whole_attention:
                s1, s2, n = channel_sums(part)
                sums = [s1, s2, n] if sums is None else [sums[0] + s1, sums[1] + s2, sums[2] + n]
            kept = ("none" if residual is None else "x" if residual is x else "carried" if residual is carried
                    else "own")
            if kept == "own":  # saved in this segment, and not the activation itself: parked beside it
                rpart, ry, rx, rf = mine(residual)
                if own_residual is None:
                    own_residual = store.canvas((batch, residual.shape[1], height * rf, width * rf), residual.dtype)
                own_residual.write(ry, rx, rpart)
            x = residual = carried = part = None
        if sync is None:
            break
        after = {"none": None, "x": target, "carried": residual_at, "own": own_residual}[kept]
        for done in (source, residual_at):
            if done is not None and done is not after:
                done.close()
        source, residual_at, attend = target, after, 0
        if sync.kind == NORM:
            mean, var = group_stats(sync.module, *sums)
            begin = lambda x, norm=sync.module, mean=mean, var=var: normalise(norm, x, mean, var)  # noqa: E731
        elif whole_attention:
            attended = store.canvas_of(sync.module(source.whole()))  # its own GroupNorm: the untiled statistics
            if source is not residual_at:
                source.close()
            source, begin = attended, None
        else:
            begin, attend = _windowed_attention(sync, *group_stats(sync.norm, *sums)), plan.context
    for done in (source, residual_at):
        if done is not None:
            done.close()
    scale_seen = out.shape[-1] // width
    if scale_seen != scale:
        raise RuntimeError(f"the decoder scaled by {scale_seen}, not the {scale} the caller planned")
    return out.permute(0, 2, 3, 1)
