"""Tiled VAE decoding with GroupNorm statistics shared across tiles.

A decoder's GroupNorms normalise with statistics of whatever they see; a tile alone would get its
own and drift in tone from its neighbours. The first choice is exact_decode.py: the decoder layer by
layer over its windows, statistics summed across them, in one pass (the caller plans it with
`plan_exact`). Where that cannot run (a decoder it does not know, parked activations that fit neither
memory nor the disk) a statistics pass runs the decoder over the whole latent and records each GroupNorm's mean/variance per
image and group; every tile is then decoded with those statistics. They are exact whenever that pass
fits the caller's memory budget; only when it does not (or runs out of memory) is it run on a
subsampled latent (nearest, not averaged: averaging shrinks the latent's variance and every statistic
downstream with it), and the result says which. Tiles overlap, read `pad` latent pixels of real
context and are blended with cos^2 weights (tiling/runner.py).
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from .decoder_program import ATTENTION
from .exact_decode import ExactDecode, decode_exact
from .group_norm import group_moments, normalise
from .parking import ParkedStore
from .plan import TilePlan
from .retry import allocator_message, free_cache, is_out_of_memory, shrink_on_oom
from .runner import RunHooks, run_tiled


class SharedGroupNorm:
    """Swaps the forward of the given GroupNorm modules for the duration of one decode.

    The swap is an instance attribute set and removed inside one call (the modules are shared by
    every graph, so nothing stays behind). `record` returns a complete list of statistics or raises:
    a pass that fails half way (out of memory) leaves nothing behind that a retry could mistake for
    finished statistics.
    """

    def __init__(self, norms: Iterable[torch.nn.GroupNorm]):
        self.norms = list(norms)

    @contextlib.contextmanager
    def _swapped(self, forward):
        for norm in self.norms:
            norm.forward = functools.partial(forward, norm)
        try:
            yield
        finally:
            for norm in self.norms:
                del norm.forward

    def record(self, run: Callable[[], object]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        stats: list[tuple[torch.Tensor, torch.Tensor]] = []

        def forward(norm, x):
            mean, var = group_moments(norm, x)
            stats.append((mean, var))
            return normalise(norm, x, mean, var)

        with self._swapped(forward):
            run()
        return stats

    def apply(self, stats: list[tuple[torch.Tensor, torch.Tensor]], run: Callable[[], torch.Tensor]) -> torch.Tensor:
        used = iter(stats)

        def forward(norm, x):
            mean, var = next(used, (None, None))
            if mean is None:
                raise RuntimeError(f"the decoder used more GroupNorms than the {len(stats)} the statistics pass recorded")
            return normalise(norm, x, mean, var)

        with self._swapped(forward):
            out = run()
        if next(used, None) is not None:
            raise RuntimeError(f"the decoder used fewer GroupNorms than the {len(stats)} the statistics pass recorded")
        return out


def _stats_latent(latents: torch.Tensor, side: int) -> torch.Tensor:
    h, w = latents.shape[-2:]
    f = min(1.0, side / max(h, w))
    if f >= 1.0:
        return latents
    size = (max(1, round(h * f)), max(1, round(w * f)))
    return F.interpolate(latents.float(), size=size, mode="nearest-exact").to(latents.dtype)


@dataclass
class DecodeResult:
    image: torch.Tensor  # B,H,W,C float32
    plan: TilePlan
    retries: list[dict]
    # when tiled: {"side": latent side the statistics came from, "exact": the whole latent's, "one_pass": summed
    # across windows (no statistics pass), "attention": "whole" latent, "windowed" or "none" (a decoder without
    # one; the statistics pass says "windowed" for any), "parked": where the one
    # pass's activations waited between GroupNorms ("device", "cpu", "disk"; None: no one pass) and "parked_bytes"
    # (planned: all of them at the fullest GroupNorm); "refused": why there was no one pass, where there is a why}
    statistics: dict | None


def _attention(exact: ExactDecode) -> str:
    if not any(step.kind == ATTENTION for step in exact.program):
        return "none"
    return "whole" if exact.whole_attention else "windowed"


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
    floor: int = 16,
    exact: ExactDecode | None = None,
    refused: str = "",
) -> DecodeResult:
    """latents: B,C,h,w -> image B,h*scale,w*scale,C float32 (what `decode` returns per window, blended).

    `decode` maps a B,C,h',w' latent window to B,3,h'*scale,w'*scale. One tile (tile 0 or a tile
    covering the latent) is a plain decode. `stats_side`: the largest latent side the statistics pass
    may decode (0: the whole latent, i.e. exact statistics). On out-of-memory the decode tiles shrink,
    and so does the statistics pass (then approximate: a subsampled latent), each through
    tiling/retry.py; the result's `retries` lists both.

    `exact` (exact_decode.plan_exact: the caller's budget and the decoder allow it): the decoder runs layer by
    layer over its windows, the whole activations parked between layers, with GroupNorm sums shared across them (tiling/exact_decode.py): exact statistics in
    one pass, no statistics pass; the middle attention over the whole latent where the plan says so. Out of
    memory there, or a parking store that cannot write, falls back to the statistics pass, and `retries` says so.
    `refused`: why the caller did not plan one (the statistics then say it).
    """
    hooks = hooks or RunHooks()
    norms = list(norms)
    shared = SharedGroupNorm(norms)
    full = tuple(latents.shape[-2:])
    retries: list[dict] = []
    if exact is not None:
        plan = exact.plan(*full)
        try:
            with ParkedStore(exact.parked, device) as store:
                image = decode_exact(exact.program, exact.halos, latents, plan, scale, device=device, dtype=dtype,
                                     store=store, whole_attention=exact.whole_attention,
                                     check_interrupt=hooks.check_interrupt)
            return DecodeResult(image, plan, retries, {"side": max(full), "exact": True, "one_pass": True,
                                                       "attention": _attention(exact),
                                                       "parked": exact.parked, "parked_bytes": exact.parked_bytes})
        except OSError as exc:  # the disk store: full, or not writable
            event = {"event": "parking_failed", "error": f"{type(exc).__name__}: {exc}"}
        except Exception as exc:  # noqa: BLE001 - only out-of-memory falls back, the rest is re-raised
            if not is_out_of_memory(exc, hooks.oom_errors):
                raise
            event = {"event": "out_of_memory", "tile": exact.tile, "retry_tile": tile,
                     "allocator": allocator_message(exc)}
        free_cache(device)
        retries.append({**event, "stage": "vae_one_pass", "parked": exact.parked, "fallback": "statistics pass"})
        refused = f"the one pass failed ({event['event']}): see retries"
    memo: list[tuple[int, list]] = []  # this call's (side, statistics), made once by the first tiled window

    def record(side: int) -> tuple[int, list]:
        small = _stats_latent(latents, side).to(device=device, dtype=dtype)
        return side, shared.record(lambda: decode(small))

    def fn(window: torch.Tensor) -> torch.Tensor:
        if tuple(window.shape[-2:]) == full:  # one tile: the decoder's own statistics are exact
            return decode(window)
        if not memo:
            side = min(stats_side or max(full), max(full))
            memo.append(shrink_on_oom(record, side, cost=lambda s: s * s, floor=min(floor, side), stage="vae_stats",
                                      device=device, retries=retries, oom_errors=hooks.oom_errors))
        return shared.apply(memo[0][1], lambda: decode(window))

    tiled = run_tiled(latents.permute(0, 2, 3, 1), fn, scale, tile=tile, overlap=overlap, context=pad,
                      device=device, dtype=dtype, floor=floor, stage="vae_decode", hooks=hooks)
    side = memo[0][0] if memo else None
    return DecodeResult(tiled.image, tiled.plan, retries + tiled.retries,
                        None if side is None else {"side": side, "exact": side >= max(full), "one_pass": False,
                                                   "attention": "windowed", "parked": None,
                                                   **({"refused": refused} if refused else {})})
