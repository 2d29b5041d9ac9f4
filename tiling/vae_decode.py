"""Tiled VAE decoding with GroupNorm statistics shared across tiles.

A decoder's GroupNorms normalise with statistics of whatever they see; a tile alone would get its
own and drift in tone from its neighbours. Here one statistics pass runs the decoder over the whole
latent (downsampled to `stats_side` when it is larger: the caller sizes that pass to its memory
budget, so it is exact whenever it fits) and records each GroupNorm's mean/variance per image and
group; every tile is then decoded with those statistics. Tiles overlap, read `pad` latent
pixels of real context and are blended with cos^2 weights (tiling/runner.py). The decoder's middle
self-attention therefore only ever sees one window, never the full latent.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from .runner import RunHooks, TiledResult, run_tiled


class SharedGroupNorm:
    """Swaps the forward of the given GroupNorm modules for the duration of a decode.

    The swap is an instance attribute set and removed inside one call (the modules are shared by
    every graph, so nothing stays behind); `stats` belongs to the call that created this object.
    """

    def __init__(self, norms: Iterable[torch.nn.GroupNorm]):
        self.norms = list(norms)
        self.stats: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._mode = "record"
        self._index = 0

    @contextlib.contextmanager
    def mode(self, mode: str):
        self._mode, self._index = mode, 0
        if mode == "record":
            self.stats.clear()
        for norm in self.norms:
            norm.forward = functools.partial(self._forward, norm)
        try:
            yield self
        finally:
            for norm in self.norms:
                del norm.forward
        if mode == "apply" and self._index != len(self.stats):
            raise RuntimeError(f"decoder used {self._index} GroupNorms but {len(self.stats)} were recorded")

    def _forward(self, norm: torch.nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        b, g = x.shape[0], norm.num_groups
        xf = x.float().reshape(b, g, -1)
        if self._mode == "record":
            var, mean = torch.var_mean(xf, dim=2, unbiased=False)
            self.stats.append((mean, var))
        else:
            if self._index >= len(self.stats):
                raise RuntimeError("decoder used more GroupNorms than the statistics pass recorded")
            mean, var = self.stats[self._index]
            self._index += 1
        y = ((xf - mean[..., None]) * torch.rsqrt(var[..., None] + norm.eps)).reshape(x.shape)
        if norm.affine:
            shape = (1, -1) + (1,) * (x.ndim - 2)
            y = y * norm.weight.float().reshape(shape) + norm.bias.float().reshape(shape)
        return y.to(x.dtype)


def _stats_latent(latents: torch.Tensor, side: int) -> torch.Tensor:
    h, w = latents.shape[-2:]
    f = min(1.0, side / max(h, w))
    if f >= 1.0:
        return latents
    size = (max(1, round(h * f)), max(1, round(w * f)))
    return F.interpolate(latents.float(), size=size, mode="area").to(latents.dtype)


def decode_tiled(
    decode: Callable[[torch.Tensor], torch.Tensor],
    norms: Iterable[torch.nn.GroupNorm],
    latents: torch.Tensor,
    *,
    scale: int,
    tile: int,
    overlap: int,
    pad: int,
    device: torch.device,
    dtype: torch.dtype,
    hooks: RunHooks | None = None,
    stats_side: int = 0,
) -> TiledResult:
    """latents: B,C,h,w -> image B,h*scale,w*scale,C float32 (what `decode` returns per window, blended).

    `decode` maps a B,C,h',w' latent window to B,3,h'*scale,w'*scale. One tile (tile 0 or a tile
    covering the latent) is a plain decode. `stats_side`: the largest latent side the statistics pass
    may decode (0: one window's side). On out-of-memory the tile is halved (run_tiled).
    """
    hooks = hooks or RunHooks()
    shared = SharedGroupNorm(norms)
    tiled = {"on": False}
    outer = hooks.tile_start

    def tile_start(plan, r, c):
        tiled["on"] = not plan.untiled
        if outer:
            outer(plan, r, c)

    def fn(window: torch.Tensor) -> torch.Tensor:
        if not tiled["on"]:
            return decode(window)
        if not shared.stats:
            with shared.mode("record"):
                side = max(stats_side, *window.shape[-2:])
                decode(_stats_latent(latents, side).to(device=device, dtype=dtype))
        with shared.mode("apply"):
            return decode(window)

    return run_tiled(
        latents.permute(0, 2, 3, 1), fn, scale, tile=tile, overlap=overlap, context=pad, device=device,
        dtype=dtype, floor=16, hooks=dataclasses.replace(hooks, tile_start=tile_start),
    )
