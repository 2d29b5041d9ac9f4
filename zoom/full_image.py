"""Chain-of-Zoom for the whole image at an arbitrary scale S (aspect ratio kept).

n x m -> round(n*S) x round(m*S): ceil(log4 S) 4x passes of the tiled upscaler, each with a prompt
(the user's; or, with a prompt model, one per tile from two images - the whole pass input and the
tile's window - with the published multi-scale instruction, or one per pass from the whole image),
a colour fix per pass against that pass's input (resized bicubic), then one exact resize to the
target. A guard refuses a target or an intermediate over `max_side`, or canvases larger than the free
memory, before any work. Chain-of-Zoom's own model gets each whole pass input and enlarges it with the
8-bit PIL bicubic the authors' loop feeds it once, then plans its own latent tiles (`sampling`: its
posterior sample or mean).
"""
from __future__ import annotations

import math
import time
from typing import Callable

import torch

from ..imaging.color_fix import color_fix as apply_color_fix
from ..imaging.image_io import to_pil
from ..runtime.errors import UpscalerError
from ..tiling import RunHooks, free_bytes, resize, target_size
from ..tiling.resample import ALPHA_NOTE, METHODS as RESAMPLE_METHODS, attach_alpha, split_alpha
from ..upscalers.contract import Impl, RunMemo, Upscaler
from ..upscalers.impl_policy import overlap_for
from ..upscalers.receipts import Resampled, ZoomPass, ZoomUpscaleReceipt
from ..upscalers.request import UpscaleRequest
from ..upscalers.size_guard import check_sizes
from ..upscalers.upscale import check_image, upscale
from .chain import sr_options
from .geometry import ZOOM
from .prompts import PromptProvider, make_prompt
from .settings import check_color_fix, check_sampling, check_zoom_upscaler, derive_seed

DEFAULT_MAX_SIDE = 8192
MAX_SCALE = 256.0


def passes_for(scale: float) -> int:
    """ceil(log4 scale) without floating-point surprises: the fewest 4x passes reaching `scale`."""
    passes = 0
    while ZOOM**passes < scale * (1 - 1e-12):
        passes += 1
    return passes


def check_scale(scale: float) -> float:
    if not isinstance(scale, (int, float)) or not math.isfinite(scale) or not 1.0 <= scale <= MAX_SCALE:
        raise UpscalerError(
            f"scale must be between 1 and {MAX_SCALE:g} (output size / input size); got {scale!r}. "
            "To make an image smaller use an image resize node."
        )
    return float(scale)


def zoom_upscale(
    upscaler: Upscaler,
    image: torch.Tensor,
    scale: float,
    *,
    user_prompt: str = "",
    provider: PromptProvider | None = None,
    tile_prompts: bool = True,
    color_fix: str = "wavelet",
    seed: int = 0,
    sampling: str = "sample",
    tile: int = 0,
    overlap: int = 0,
    resample: str = "lanczos",
    max_side: int = DEFAULT_MAX_SIDE,
    device: torch.device | None = None,
    hooks: RunHooks | None = None,
    on_pass: Callable[[int, int, torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, ZoomUpscaleReceipt]:
    """Upscale `image` (B,H,W,C) by `scale`; returns (B,round(H*S),round(W*S),C, receipt).

    on_pass(pass_number, total_passes, image) is called after each pass (previews).
    """
    started = time.perf_counter()
    hooks = hooks or RunHooks()
    check_image(image)
    scale = check_scale(scale)
    check_zoom_upscaler(upscaler)
    check_color_fix(color_fix)
    check_sampling(sampling)
    options, applied = sr_options(upscaler, sampling, tile, overlap)
    derive_seed(seed)
    if resample not in RESAMPLE_METHODS:
        raise UpscalerError(f"resample must be one of {', '.join(RESAMPLE_METHODS)}; got {resample!r}")
    if not isinstance(max_side, int) or max_side < 1:
        raise UpscalerError(f"max_side must be a positive number of pixels; got {max_side!r}")
    batch, height, width, _ = image.shape
    out_h, out_w = target_size(height, width, scale)
    if max(out_h, out_w) > max_side:
        raise UpscalerError(
            f"scale {scale:g} turns the {width}x{height} image into {out_w}x{out_h}, over max_side {max_side} px: "
            f"lower the scale to at most {max_side / max(height, width):.4g}, use a smaller image, or raise max_side"
        )
    passes = passes_for(scale)
    # Every 4x intermediate too (a 4.1x request builds a 16x one), before any work; one image at a time.
    stages = [(f"pass {p} of {passes} (x{ZOOM**p})", width * ZOOM**p, height * ZOOM**p) for p in range(1, passes + 1)]
    check_sizes(stages + [("the output", out_w, out_h)], 1, 3, max_side=max_side,
                free=(hooks.free_bytes or free_bytes)(torch.device("cpu")))
    rgb, alpha = split_alpha(image)
    memo = RunMemo()  # one run: a prompt's embedding is made once across passes and images

    outputs, pass_receipts = [], []
    for index in range(batch):
        current = rgb[index:index + 1].float()
        for p in range(1, passes + 1):
            if hooks.check_interrupt:
                hooks.check_interrupt()
            pass_seed = derive_seed(seed, p, index)
            prompt, prompt_note = _pass_prompt(provider, tile_prompts, current, user_prompt, pass_seed, hooks)
            request = UpscaleRequest(tile=tile, overlap=overlap_for(Impl.GAN, overlap), prompt=prompt, seed=pass_seed,
                                     options=options)
            up, up_receipt = upscale(upscaler, current, request, device=device, hooks=hooks, memo=memo)
            if color_fix != "none":
                up = apply_color_fix(up, current, color_fix)
            pass_receipts.append(ZoomPass(index, p, [current.shape[2], current.shape[1]], [up.shape[2], up.shape[1]],
                                          prompt_note, up_receipt))
            current = up
            if on_pass:
                on_pass(p, passes, current)
        outputs.append(resize(current, out_h, out_w, resample))
    out = attach_alpha(torch.cat(outputs, dim=0), alpha)
    reached = ZOOM**passes
    resampled = (out_h, out_w) != (height * reached, width * reached)
    receipt = ZoomUpscaleReceipt(
        requested_scale=scale, pass_count=passes, reached_scale=reached, input_size=[width, height],
        output_size=[out_w, out_h], intermediate_size=[width * reached, height * reached],
        resampled=Resampled(float(reached), resample) if resampled else None, max_side=max_side, color_fix=color_fix,
        seed=seed, batch=batch, prompt_provider=provider.name if provider else "null", user_prompt=user_prompt,
        alpha=ALPHA_NOTE if alpha is not None else None, passes=pass_receipts,
        seconds=round(time.perf_counter() - started, 3), sampling=applied)
    return out, receipt


def _pass_prompt(provider, tile_prompts, current, user_prompt, seed, hooks):
    """The prompt argument for one pass's upscale(): text, or a function of a tile's window box."""
    if provider is None:
        return user_prompt, "user prompt"
    whole = to_pil(current)
    check = hooks.check_interrupt
    if not tile_prompts:
        text, _ = make_prompt(provider, [whole], user_prompt, seed=seed, check_interrupt=check)
        return text, "one per pass (single-image instruction)"

    def per_tile(box: tuple[int, int, int, int]) -> str:
        text, _ = make_prompt(provider, [whole, whole.crop(box)], user_prompt, seed=derive_seed(seed, *box),
                              check_interrupt=check)
        return text

    return per_tile, "one per tile (two-image multi-scale instruction: the pass input, then the tile)"


__all__ = ["DEFAULT_MAX_SIDE", "passes_for", "zoom_upscale"]
