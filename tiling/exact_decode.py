"""A tiled VAE pass that equals the untiled one: GroupNorm statistics summed across windows, in one pass.

A GroupNorm's statistics are sums over the image. Every window runs at once, one thread per window and one
computing at a time (a turnstile, so torch's own threads do the parallel work); at each GroupNorm a window
adds the per-channel sums of the region it owns (the plan's tiles partitioned at the middle of each
overlap, scaled to the layer's resolution) and waits; when every window has added its sums, all normalise
with the whole image's mean and variance. What a window owns is exact as long as the window reads more
real context than the decoder's receptive field (SD x4 VAE decoder: 16.5 latent px; windows read
`context` + overlap/2), so the statistics and the owned output are the untiled pass's, and the owned
regions are pasted (no blend: nothing to hide).

The decoder's middle self-attention is global. With `attention` given, its input is likewise gathered
from every window's owned region, it runs once over the whole latent, and every window takes its own
part of the result (also exact); without, each window attends within itself (an approximation, which
the caller records).

Memory: every window's activations are alive together (about the untiled pass's activations times the
plan's window area ratio); the caller plans this from its budget and otherwise uses the statistics
pass of vae_tiles.py.
"""
from __future__ import annotations

import functools
import threading
from typing import Callable, Iterable

import torch

from .group_norm import normalise
from .plan import AxisPlan, TilePlan

ATTENTION_SHARE = 0.1  # whole-latent attention when it costs at most this share of the decode more than windows


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


class _Shared:
    """The state of one decode: accumulated sums, the statistics and gathered attention inputs."""

    def __init__(self, windows: int):
        self.turn = threading.Lock()
        self.local = threading.local()
        self.sums: list | None = None  # [sum, sum of squares, count] of the current GroupNorm
        self.stats: tuple[torch.Tensor, torch.Tensor] | None = None
        self.gathered: torch.Tensor | None = None
        self.attended: torch.Tensor | None = None
        self.barrier = threading.Barrier(windows, action=self._reduce)
        self.norm: torch.nn.GroupNorm | None = None
        self.attention: Callable | None = None
        self.error: BaseException | None = None

    def _reduce(self) -> None:
        """Runs once per GroupNorm (or attention), in the last window to arrive."""
        try:
            if self.gathered is not None:
                tile, self.local.tile = getattr(self.local, "tile", None), None  # its GroupNorm: a plain one
                try:
                    self.attended, self.gathered = self.attention(self.gathered), None
                finally:
                    self.local.tile = tile
                return
            if self.sums is None:
                return  # a wait with nothing to reduce (every window has taken its part of the attention)
            s1, s2, n = self.sums
            groups = self.norm.num_groups
            b = s1.shape[0]
            count = n * (s1.shape[1] // groups)
            mean = s1.reshape(b, groups, -1).sum(-1) / count
            var = (s2.reshape(b, groups, -1).sum(-1) / count - mean**2).clamp_min(0)
            self.stats, self.sums = (mean.float(), var.float()), None
        except BaseException as exc:  # noqa: BLE001 - handed to the caller; every window stops
            self.error = exc
            raise

    def wait(self) -> None:
        """Give the turn away, wait for every window, take the turn back."""
        self.turn.release()
        try:
            self.barrier.wait()
        finally:
            self.turn.acquire()


def decode_exact(
    decode: Callable[[torch.Tensor], torch.Tensor],
    norms: Iterable[torch.nn.GroupNorm],
    latents: torch.Tensor,
    plan: TilePlan,
    scale: int,
    *,
    device: torch.device,
    dtype: torch.dtype,
    attention: torch.nn.Module | None = None,
    check_interrupt: Callable[[], None] | None = None,
) -> torch.Tensor:
    """latents B,C,h,w -> B,h*scale,w*scale,C' float32, equal to decode(latents) (see the module's doc).

    `decode` maps a B,C,h',w' window to B,C',h'*scale,w'*scale; `attention` (optional) is the decoder's
    global self-attention module at latent resolution, run once over the whole latent."""
    norms = list(norms)
    rows, cols = owned(plan.rows), owned(plan.cols)
    tiles = list(plan.tiles())
    shared = _Shared(len(tiles))
    batch, _, height, width = latents.shape
    results: dict[tuple[int, int], torch.Tensor] = {}

    def region(r: int, c: int, h: int, w: int):
        """The owned box of tile (r, c) inside its window, at a layer whose window is h x w."""
        f = h // plan.rows.window
        if f * plan.rows.window != h or w != f * plan.cols.window:
            raise RuntimeError(f"a {h}x{w} activation is not a whole multiple of the {plan.rows.window}x"
                               f"{plan.cols.window} window: this network cannot be tiled exactly")
        (y0, y1), (x0, x1) = rows[r], cols[c]
        oy, ox = plan.rows.window_starts[r], plan.cols.window_starts[c]
        return f, slice((y0 - oy) * f, (y1 - oy) * f), slice((x0 - ox) * f, (x1 - ox) * f)

    def norm_forward(norm, x):
        me = getattr(shared.local, "tile", None)
        if me is None:  # the whole-latent attention's own GroupNorm (run in _reduce): a plain GroupNorm
            return torch.nn.functional.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
        if check_interrupt:
            check_interrupt()
        spatial = x
        if x.ndim == 3:  # inside attention: B,C,tokens of the window's grid at latent resolution
            f = round((x.shape[-1] / (plan.rows.window * plan.cols.window)) ** 0.5)
            spatial = x.reshape(x.shape[0], x.shape[1], plan.rows.window * f, plan.cols.window * f)
        _, ys, xs = region(*me, *spatial.shape[-2:])
        part = spatial[..., ys, xs]
        n = part.shape[-1] * part.shape[-2]
        # per-channel moments in one pass over the activation (no float64 copy of it), summed in float64
        var_c, mean_c = (t.double() for t in torch.var_mean(part.float(), dim=(2, 3), unbiased=False))
        s1, s2 = mean_c * n, (var_c + mean_c * mean_c) * n
        if shared.sums is None:
            shared.sums, shared.norm = [s1, s2, n], norm
        else:
            shared.sums[0] += s1
            shared.sums[1] += s2
            shared.sums[2] += n
        del part
        shared.wait()
        mean, var = shared.stats
        return normalise(norm, x, mean, var)

    def attention_forward(module_forward, hidden, *args, **kwargs):
        me = getattr(shared.local, "tile", None)
        if me is None:
            return module_forward(hidden, *args, **kwargs)
        f, ys, xs = region(*me, *hidden.shape[-2:])
        if shared.gathered is None:
            shared.gathered = hidden.new_empty((hidden.shape[0], hidden.shape[1], height * f, width * f))
            shared.attention = lambda full: module_forward(full, *args, **kwargs)
        (y0, y1), (x0, x1) = rows[me[0]], cols[me[1]]
        shared.gathered[..., y0 * f:y1 * f, x0 * f:x1 * f] = hidden[..., ys, xs]
        shared.wait()
        oy, ox = plan.rows.window_starts[me[0]] * f, plan.cols.window_starts[me[1]] * f
        out = shared.attended[..., oy:oy + hidden.shape[-2], ox:ox + hidden.shape[-1]].clone()
        shared.wait()  # every window has its part: the whole result can go
        shared.attended = None
        return out

    def worker(r: int, c: int) -> None:
        shared.local.tile = (r, c)
        with shared.turn:
            try:
                if check_interrupt:
                    check_interrupt()
                window = latents[..., plan.rows.window_starts[r]:plan.rows.window_starts[r] + plan.rows.window,
                                 plan.cols.window_starts[c]:plan.cols.window_starts[c] + plan.cols.window]
                y = decode(window.to(device=device, dtype=dtype).contiguous())
                _, ys, xs = region(r, c, y.shape[-2] // scale, y.shape[-1] // scale)
                (y0, y1), (x0, x1) = rows[r], cols[c]
                ys = slice(ys.start * scale, ys.stop * scale)
                xs = slice(xs.start * scale, xs.stop * scale)
                results[(r, c)] = y[..., ys, xs].float().cpu()
            except threading.BrokenBarrierError:
                pass  # another window failed: its error is the one reported
            except BaseException as exc:  # noqa: BLE001 - the first error stops every window and is re-raised
                if shared.error is None:
                    shared.error = exc
                shared.barrier.abort()

    for norm in norms:
        norm.forward = functools.partial(norm_forward, norm)
    if attention is not None:
        attention.forward = functools.partial(attention_forward, type(attention).forward.__get__(attention))
    threads = [threading.Thread(target=worker, args=tile, name=f"vae-window-{tile[0]}-{tile[1]}", daemon=True)
               for tile in tiles]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        for norm in norms:
            del norm.forward
        if attention is not None:
            del attention.forward
    if shared.error is not None:
        raise shared.error
    first = next(iter(results.values()))
    out = torch.empty((batch, first.shape[1], height * scale, width * scale), dtype=torch.float32)
    for (r, c), part in results.items():
        (y0, y1), (x0, x1) = rows[r], cols[c]
        out[..., y0 * scale:y1 * scale, x0 * scale:x1 * scale] = part
    return out.permute(0, 2, 3, 1)
