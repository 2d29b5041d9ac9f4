"""Chain-of-Zoom: one scale-state transition (`zoom_step`) and the loop built from it (`zoom_loop`).

Published algorithm (../shared/reference/chain_of_zoom.md), per image:
  x0 = prepare(image): short side to process_size (LANCZOS, int() sizes), centre crop w x w.
  step n (makes x_n from x_{n-1}; w = process_size):
    recursive / recursive_multiscale: crop the centre w/4 of x_{n-1}
    onestep / nearest / bicubic:       crop the centre w/4**n of x0
    nearest / bicubic: x_n = that crop resized to w x w (NEAREST / BICUBIC); no model, no prompt.
    otherwise the SR model enlarges the crop by 4 to w x w (onestep: the crop BICUBIC-resized to w/4
    first), with a prompt made from the bicubic view (the crop BICUBIC-resized to w x w) - or, in
    recursive_multiscale, from two images: x_{n-1} and that view - and the output is colour-fixed
    against the bicubic view.

The reference's SR model takes the bicubic view itself (a same-size one-step diffusion model); a 4x
upscaler (SD x4, a 4x GAN) takes the crop it would have been resized from and lands on the same w x w.
Chain-of-Zoom's own model (upscalers/coz_sd3) enlarges that 8-bit crop with the same PIL BICUBIC, so it
restores exactly the view (recursive modes). With that model the states are made as the reference makes
them: the SR output truncated to 8 bits (ToPILImage), colour-fixed on that 8-bit image and truncated again.
With any other upscaler the colour-fixed output is rounded to 8 bits: truncation would lower every state
by half a level on average, a drift the colour fix cannot see (its reference is the previous state).
Loop == Step chained: the loop calls zoom_step for n = 1..steps, nothing else.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
from PIL import Image

from ..imaging.color_fix import color_fix as apply_color_fix
from ..imaging.image_io import from_pil, to_pil
from ..runtime.errors import UpscalerError
from ..upscalers.contract import Impl, Upscaler
from ..upscalers.coz_sd3 import CoZOptions, CoZSD3Upscaler
from ..upscalers.coz_sd3.backend import ONESTEP_NOTE
from ..upscalers.impl_policy import overlap_for
from ..upscalers.receipts import (
    ColorFixRecord, ModelRecord, ModelSummary, ZoomCrop, ZoomLoopReceipt, ZoomPrompt, ZoomStepReceipt,
)
from ..upscalers.request import UpscaleRequest
from ..upscalers.sdx4 import SDX4Options, SDX4Upscaler
from ..upscalers.upscale import check_image, upscale
from .geometry import RECURSIVE_MODES, SR_MODES, ZOOM, prepare, step_factor, zoom_crop
from .prompts import make_prompt
from .settings import ZoomSettings, check_sampling, check_step, derive_seed


def sr_options(upscaler: Upscaler | None, sampling: str, tile: int = 0, overlap: int = 0):
    """(options for upscale(), the sampling that applies). `tile` / `overlap` are input px for every upscaler
    (overlap 0 = auto, impl_policy.AUTO_OVERLAP); the models that plan their own latent tiles get them converted here:
    CoZOptions for Chain-of-Zoom's own model (latent = input / 2), SDX4Options for SD x4 (latent = input, its other
    settings at their defaults), None for a GAN (which tiles in input px itself). The sampling applies to
    Chain-of-Zoom's model only (a GAN has no noise; SD x4 samples its own, seeded)."""
    if isinstance(upscaler, CoZSD3Upscaler):
        options = CoZOptions.from_input_px(tile, overlap_for(Impl.DIFFUSION, overlap), sampling=check_sampling(sampling))
        return options, sampling
    if isinstance(upscaler, SDX4Upscaler):
        return SDX4Options(tile=tile, overlap=overlap_for(Impl.DIFFUSION, overlap)), None
    return None, None


def truncate(image: torch.Tensor) -> torch.Tensor:
    """1,H,W,C float -> the same on the 8-bit grid as torchvision's ToPILImage makes it: mul(255).byte(), truncation."""
    return image.clamp(0, 1).mul(255).to(torch.uint8).float().div(255)


def published_state(out: torch.Tensor, view: Image.Image, color_fix: str) -> Image.Image:
    """x_n from the SR output as the reference makes it: ToPILImage (truncation), the colour fix on that 8-bit
    image against the view, ToPILImage again."""
    state = truncate(out.float())
    if color_fix != "none":
        state = truncate(apply_color_fix(state, from_pil(view), color_fix))
    return to_pil(state)  # exact: already on the 8-bit grid


@dataclass
class StepResult:
    state: Image.Image  # x_n, w x w 8-bit RGB
    prompt: str
    receipt: ZoomStepReceipt
    view: Image.Image | None = None  # the bicubic view (colour-fix reference), None for baselines


def zoom_step(upscaler: Upscaler | None, state: Image.Image, step: int, settings: ZoomSettings, *,
              origin: Image.Image | None = None, index: int = 0) -> StepResult:
    """Make x_step from x_{step-1} = `state` (recursive modes) or from x0 = `origin` (the others).

    Both images are prepared first (a no-op for a process_size square). `index` is the image's place
    in its batch (it only enters the derived seed).
    """
    started = time.perf_counter()
    s = settings
    s.check(upscaler)
    w = s.process_size
    check_step(s.mode, step, w)
    recursive = s.mode in RECURSIVE_MODES
    if not recursive and origin is None:
        raise UpscalerError(
            f"mode {s.mode} crops the first scale-state x0 at every step: connect x0 (the loop's input image) "
            "to 'origin'"
        )
    state = prepare(state, w)
    source = state if recursive else prepare(origin, w)
    factor = step_factor(s.mode, step)
    crop, box = zoom_crop(source, factor)
    seed = derive_seed(s.seed, step, index)

    def receipt(**what_ran) -> ZoomStepReceipt:  # built once, when the step is done
        return ZoomStepReceipt(
            step=step, image=index, mode=s.mode, magnification=ZOOM**step, process_size=w,
            crop=ZoomCrop(f"x{step - 1}" if recursive else "x0", list(box), factor), seed=seed,
            seconds=round(time.perf_counter() - started, 3), **what_ran)

    if s.mode in ("nearest", "bicubic"):
        method = Image.Resampling.NEAREST if s.mode == "nearest" else Image.Resampling.BICUBIC
        new = crop.resize((w, w), method)
        return StepResult(new, "", receipt(sr_input_size=None, prompt=None, color_fix=None, upscale=None))

    view = crop.resize((w, w), Image.Resampling.BICUBIC)  # the published SR input / prompt image / colour reference
    lr = crop if s.mode != "onestep" else crop.resize((w // ZOOM, w // ZOOM), Image.Resampling.BICUBIC)
    prompt_images = [state, view] if s.mode == "recursive_multiscale" else [view]
    prompt, generated = make_prompt(s.provider, prompt_images, s.user_prompt, seed=seed,
                                    check_interrupt=s.hooks.check_interrupt)
    if s.hooks.check_interrupt:
        s.hooks.check_interrupt()
    options, sampling = sr_options(upscaler, s.sampling, s.tile, s.overlap)
    # onestep past step 1 shrinks the crop before the model (step 1's reduction is to the crop's own size)
    notes = (ONESTEP_NOTE,) if s.mode == "onestep" and step > 1 and options is not None else ()
    request = UpscaleRequest(tile=s.tile, overlap=overlap_for(Impl.GAN, s.overlap), prompt=prompt, seed=seed,
                             options=options, notes=notes)
    out, up_receipt = upscale(upscaler, from_pil(lr), request, device=s.device, hooks=s.hooks, memo=s.memo)
    if tuple(out.shape[1:3]) != (w, w):
        raise UpscalerError(f"the upscaler made {tuple(out.shape[1:3])} from a {lr.size} crop; expected {w}x{w}")
    if options is not None:  # Chain-of-Zoom's own model: the states exactly as the paper's code makes them
        new = published_state(out, view, s.color_fix)
    else:  # any other upscaler: rounded onto the 8-bit grid (truncating would darken by half a level a step)
        if s.color_fix != "none":
            out = apply_color_fix(out, from_pil(view), s.color_fix)
        new = to_pil(out)
    return StepResult(new, prompt, receipt(
        sr_input_size=list(lr.size), sampling=sampling, upscale=up_receipt,
        prompt=ZoomPrompt(prompt, generated, s.provider.name if s.provider else "null",
                          len(prompt_images) if s.provider else 0),
        color_fix=ColorFixRecord(s.color_fix, "bicubic view of the crop") if s.color_fix != "none" else None), view)


@dataclass
class LoopResult:
    states: list[list[Image.Image]]  # per batch image: [x0, x1, ..., x_steps]
    prompts: list[list[str]]  # per batch image: the prompt of each step
    receipt: ZoomLoopReceipt

    def tensor(self) -> torch.Tensor:
        """IMAGE batch: every state of image 0, then every state of image 1, ..."""
        return torch.cat([from_pil(s) for states in self.states for s in states], dim=0)


def zoom_loop(upscaler: Upscaler | None, image: torch.Tensor, steps: int, settings: ZoomSettings, *,
              on_state: Callable[[int, int, Image.Image], None] | None = None) -> LoopResult:
    """x0 = prepare(image) and `steps` zoom steps for each image of the batch.

    on_state(index, n, x_n) is called after each state (progress, previews); interrupts are honoured
    between steps through settings.hooks.check_interrupt (and within them, between tiles).
    """
    started = time.perf_counter()
    check_image(image)
    settings.check(upscaler)
    if not isinstance(steps, int) or not 1 <= steps <= 8:
        raise UpscalerError(f"steps must be 1..8 (x_steps is 4**steps times x0); got {steps!r}")
    check_step(settings.mode, steps, settings.process_size)
    all_states, all_prompts, step_receipts = [], [], []
    for index in range(image.shape[0]):
        x0 = prepare(to_pil(image[index]), settings.process_size)
        states, prompts = [x0], []
        if on_state:
            on_state(index, 0, x0)
        for n in range(1, steps + 1):
            if settings.hooks.check_interrupt:
                settings.hooks.check_interrupt()
            result = zoom_step(upscaler, states[-1], n, settings, origin=x0, index=index)
            states.append(result.state)
            prompts.append(result.prompt)
            step_receipts.append(result.receipt)
            if on_state:
                on_state(index, n, result.state)
        all_states.append(states)
        all_prompts.append(prompts)
    receipt = ZoomLoopReceipt(
        mode=settings.mode, steps=steps, process_size=settings.process_size, batch=image.shape[0],
        input_size=[image.shape[2], image.shape[1]], magnifications=[ZOOM**n for n in range(steps + 1)],
        seed=settings.seed, sampling=sr_options(upscaler, settings.sampling)[1] if settings.mode in SR_MODES else None,
        prompts=all_prompts, color_fix=settings.color_fix,
        prompt_provider=settings.provider.name if settings.provider else "null",
        upscaler=_summary(upscaler) if settings.mode in SR_MODES else None,
        step_receipts=step_receipts, seconds=round(time.perf_counter() - started, 3))
    return LoopResult(all_states, all_prompts, receipt)


def _summary(upscaler: Upscaler | None) -> ModelSummary | None:
    if upscaler is None:
        return None
    return ModelSummary(ModelRecord(**upscaler.source.describe()), upscaler.capabilities.impl, upscaler.scale)
