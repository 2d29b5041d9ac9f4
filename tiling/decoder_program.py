"""A decoder as a program: window-local steps, and the GroupNorms and attention between them.

For the layered exact decode (exact_decode.py). Between two GroupNorms every step is local to a window
(convolutions, activations, nearest upsampling, residual adds), so windows can run one at a time while the
whole activation waits, parked, where the whole image's statistics are needed. A backend builds the program from its network
(upscalers/vae_program.py for diffusers' VAE decoders) or raises NotAProgram; `probe` runs the program
beside the decoder on a small latent: a program that does not reproduce the decoder is refused, and the
probe measures how far each segment's convolutions reach (the halo a window reads beyond what it owns) and
what a run parks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from ..runtime.dtypes import itemsize

LOCAL, NORM, SAVE, ADD, ATTENTION = "local", "norm", "save", "add", "attention"
PROBE_SIDE = 8  # latent px of the probe: small, and the attention's share of it negligible


class NotAProgram(Exception):
    """The decoder is not built the way the program expects (the caller falls back to a statistics pass)."""


@dataclass(frozen=True)
class Step:
    kind: str  # LOCAL x -> module(x); NORM (a GroupNorm: a sync point); SAVE the residual; ADD it back; ATTENTION
    # (a module x -> x whose first operation is its GroupNorm `norm`, global over the tokens: a sync point)
    module: Callable | None = None  # ADD: the shortcut (None: identity); ATTENTION: the attention module
    factor: float = 1.0  # ADD: the block's output_scale_factor
    # ATTENTION: its GroupNorm (applied first to its input) and its width (the cost of attending over the whole latent)
    norm: torch.nn.GroupNorm | None = None
    width: int = 0


@dataclass(frozen=True)
class Probe:
    # per segment (the program cut at its sync points): px of context, at the segment's input resolution, that its
    # convolutions reach; a window that reads this much more than it owns computes what it owns exactly
    halos: tuple[int, ...]
    parked_per_px: float  # bytes of activations parked at once at the fullest segment, per latent px


def run_local(step: Step, x: torch.Tensor, residual: torch.Tensor | None):
    """One window-local step (LOCAL, SAVE, ADD): (x, residual) after it."""
    if step.kind == LOCAL:
        return step.module(x), residual
    if step.kind == SAVE:
        return x, x
    if step.kind == ADD:
        shortcut = residual if step.module is None else step.module(residual)
        return (shortcut + x) / step.factor, None
    raise ValueError(f"a {step.kind} step is a sync point, not a local step")


def run_whole(steps: list[Step], x: torch.Tensor, on_sync: Callable | None = None,
              on_local: Callable | None = None) -> torch.Tensor:
    """The program over one whole tensor (every GroupNorm with its own statistics): what the decoder computes.
    `on_sync(x, residual)` is called before each GroupNorm or attention, `on_local(step, y)` after each LOCAL or ADD step."""
    residual = None
    for step in steps:
        if step.kind in (NORM, ATTENTION):
            if on_sync:
                on_sync(x, residual)
            x = step.module(x)
            continue
        x, residual = run_local(step, x, residual)
        if on_local and step.kind in (LOCAL, ADD):
            on_local(step, x)
    return x


def probe(steps: list[Step], decode: Callable[[torch.Tensor], torch.Tensor], channels: int, device,
          dtype: torch.dtype) -> Probe:
    """Check the program against `decode` on a PROBE_SIDE^2 latent; measure each segment's halo and what parks."""
    z = torch.randn(1, channels, PROBE_SIDE, PROBE_SIDE, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    syncs: list[tuple] = [(None, None)]  # (x, residual) at each sync point: what a layered run parks there
    halos: list[int] = []
    reach = [0.0, PROBE_SIDE]  # this segment's reach so far, its input's width

    def on_sync(x, residual):
        syncs.append((x, residual))
        halos.append(math.ceil(reach[0]))
        reach[:] = [0.0, x.shape[-1]]

    def on_local(step, y):
        if isinstance(step.module, torch.nn.Module):
            g = y.shape[-1] / reach[1]  # this step's output px per segment input px
            for conv in step.module.modules():
                if isinstance(conv, torch.nn.Conv2d):
                    reach[0] += (conv.kernel_size[0] // 2) * conv.dilation[0] / g

    with torch.inference_mode():
        ours = run_whole(steps, z, on_sync, on_local)
        theirs = decode(z)
    if not (ours.shape == theirs.shape and torch.allclose(ours.float(), theirs.float(), atol=1e-5, rtol=1e-4)):
        raise NotAProgram("the program does not reproduce the decoder")
    halos.append(math.ceil(reach[0]))

    def parked(tensors) -> int:  # each tensor once (a residual block's input is its residual)
        unique = {id(t): t for t in tensors if t is not None}
        return sum(t.numel() * itemsize(t.dtype) for t in unique.values())

    # a segment reads the canvases of the sync point before it while it writes those of the one ending it
    peak = max(parked(a + b) for a, b in zip(syncs, syncs[1:] + [(None, None)]))
    return Probe(halos=tuple(halos), parked_per_px=peak / PROBE_SIDE**2)
