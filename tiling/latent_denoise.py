"""Tiled latent denoising: one model call per overlapping latent tile, outputs blended with cos^2 weights.

Every step predicts on every tile and blends the predictions into ONE prediction for the whole latent
before the scheduler steps it, so tiles share one trajectory (no independently hallucinated tiles).
The model input carries its conditioning channels (for SD x4 the noise-augmented low-res image), so
each tile sees its own slice of them. A single tile is exactly an untiled call.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from .plan import TilePlan, plan_tiles
from .runner import RunHooks, run_plan


def plan_latent(height: int, width: int, tile: int, overlap: int) -> TilePlan:
    """Tiles over a latent; tile <= 0 or >= the latent gives one tile. No extra context: the blend
    weights fade each tile out before its border."""
    return plan_tiles(height, width, tile, overlap, context=0)


def predict_tiled(x: torch.Tensor, predict: Callable[[torch.Tensor], torch.Tensor], plan: TilePlan,
                  dtype: torch.dtype, hooks: RunHooks, tiles_per_call: int = 1,
                  retries: list | None = None) -> torch.Tensor:
    """x: B,C,h,w model input on the compute device -> B,C_out,h,w float32 blended prediction.

    `tiles_per_call` > 1 stacks that many equal windows along the batch of one `predict` call (which must
    accept any batch that is a multiple of B); out of memory halves it, recorded in `retries`."""
    out = run_plan(x.permute(0, 2, 3, 1), predict, 1, plan, x.device, dtype, hooks, tiles_per_call=tiles_per_call,
                   retries=retries)
    return out.permute(0, 3, 1, 2)


def step_hooks(hooks: RunHooks, step: int, steps: int, tiles: int) -> RunHooks:
    """Progress over steps x tiles for one step's tiles."""
    if hooks.progress is None:
        return hooks
    outer = hooks.progress
    return dataclasses.replace(hooks, progress=lambda done, _total: outer(step * tiles + done, steps * tiles))
