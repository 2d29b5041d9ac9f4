"""Refuse, before any work, an upscale whose intermediates or output would not fit.

A 16x intermediate of a 4.1x request, or a batch of 4096 px outputs, is decided by the request alone:
checking it up front turns a crash (or a machine swapping for minutes) into an error that names the
sizes and the fix.
"""
from __future__ import annotations

import os

import torch

from ..runtime.errors import UpscalerError
from ..tiling.memory import canvas_bytes, free_bytes
from ..tiling.resample import target_size
from .impl_policy import ScalePlan, plan_scale

ENV_MAX_SIDE = "DREAMFORGE_MAX_SIDE"  # operators: the largest side any intermediate or output may have
DEFAULT_MAX_SIDE = 16384
GB = 1024**3


def max_side_limit() -> int:
    value = os.environ.get(ENV_MAX_SIDE, "").strip()
    if not value:
        return DEFAULT_MAX_SIDE
    if not value.isdigit() or int(value) < 1:
        raise UpscalerError(f"{ENV_MAX_SIDE}={value!r}: set it to a positive number of pixels (or unset it)")
    return int(value)


def check_sizes(stages: list[tuple[str, int, int]], batch: int, channels: int, *, max_side: int, free: int) -> None:
    """stages: (label, width, height) of every intermediate and the output, in order.

    Raises UpscalerError when a side passes `max_side`, or when two consecutive canvases (a pass's
    input and output live together) need more than `free` bytes of system memory.
    """
    for label, w, h in stages:
        if max(w, h) > max_side:
            raise UpscalerError(
                f"{label} would be {w}x{h}, over the largest side allowed ({max_side} px; output "
                f"{stages[-1][1]}x{stages[-1][2]}). Fix: lower the scale, use a smaller image, or raise the limit "
                f"({ENV_MAX_SIDE} / max_side)."
            )
    sizes = [canvas_bytes(batch, h, w, channels, 1) for _, w, h in stages]  # float32 canvases
    need, at = max((a + b, i) for i, (a, b) in enumerate(zip([0] + sizes, sizes)))
    if need > free:
        label, w, h = stages[at]
        raise UpscalerError(
            f"{label} needs a {w}x{h} canvas ({need / GB:.1f} GB with its input, batch {batch}; output "
            f"{stages[-1][1]}x{stages[-1][2]}) but only {free / GB:.1f} GB of memory are free. Fix: lower the "
            "scale, upscale fewer images at once, or free memory."
        )


def upscale_stages(width: int, height: int, splan: ScalePlan) -> list[tuple[str, int, int]]:
    """(label, width, height) of every native pass's output and, when resampled, the final image."""
    stages = [(f"pass {k} of {splan.passes} (x{splan.native**k})", width * splan.native**k, height * splan.native**k)
              for k in range(1, splan.passes + 1)]
    out_h, out_w = target_size(height, width, splan.requested)
    if (out_w, out_h) != stages[-1][1:]:
        stages.append(("the output", out_w, out_h))
    return stages


def check_planned(splan: ScalePlan, width: int, height: int, channels: int, *, batch: int = 1,
                  max_side: int | None = None, free: int | None = None) -> None:
    """upscale()'s check of one request: every pass and the output against the max side and the free system
    memory (tiling runs on the compute device, but the canvases live in system memory)."""
    check_sizes(upscale_stages(width, height, splan), batch, max(3, channels), max_side=max_side or max_side_limit(),
                free=free if free is not None else free_bytes(torch.device("cpu")))


def check_request(upscaler, width: int, height: int, channels: int, scale: float | None, *,
                  strict_scale: bool = False, max_side: int | None = None, free: int | None = None) -> None:
    """The same check from the sizes alone (an image file's header), so a file whose upscale is refused
    anyway is refused before its pixels are decoded."""
    splan = plan_scale(upscaler.capabilities, scale, strict_scale, upscaler.source.file)
    check_planned(splan, width, height, channels, max_side=max_side, free=free)
