"""One upscale request end to end: validate, plan scale, tiled native passes, exact resample, receipt."""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable

import torch

from ..runtime import cpu_allocator
from ..runtime.dtypes import cpu_bf16_accelerated, dtype_name
from ..runtime.errors import UpscalerError
from ..tiling import RunHooks, TileOOMError, free_bytes, is_out_of_memory, resize, run_tiled, target_size
from ..tiling.cost import arch_of, choose_plan, costs_for, max_tiles_per_call, memory_factor
from ..tiling.memory import BUDGET_FRACTION, canvas_bytes
from ..tiling.resample import ALPHA_NOTE, attach_alpha, split_alpha
from .contract import Conditioning, Impl, RunMemo, Upscaler
from .impl_policy import plan_scale
from .receipts import (
    Degraded, FallbackStep, ModelRecord, PassRecord, PromptRecord, Resampled, TilePrompt, UpscaleReceipt,
)
from .request import Prompt, UpscaleRequest
from .size_guard import check_planned

log = logging.getLogger("dreamforge_upscale")

PREPARE_PIXELS = 1024 * 1024  # at most this much activation memory is asked of the manager up front


def check_image(image: torch.Tensor, name: str = "image") -> None:
    """ComfyUI IMAGE: float B,H,W,C with C in 1/3/4, non-empty, finite."""
    if not isinstance(image, torch.Tensor) or image.ndim != 4:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise UpscalerError(f"{name} must be a ComfyUI IMAGE tensor [batch, height, width, channels]; got {shape}")
    b, h, w, c = image.shape
    if b == 0 or h == 0 or w == 0:
        raise UpscalerError(f"{name} is empty ({b} images of {w}x{h}): connect an image of at least 1x1 pixels")
    if c not in (1, 3, 4):
        raise UpscalerError(f"{name} has {c} channels; expected 1 (grey), 3 (RGB) or 4 (RGBA)")
    if not image.is_floating_point():
        raise UpscalerError(f"{name} must be float in 0..1, got {image.dtype}")
    if not bool(torch.isfinite(image).all()):
        raise UpscalerError(
            f"{name} contains NaN or infinite values: the node that produced it failed; fix that node "
            "(e.g. a VAE decode in fp16) before upscaling"
        )


def _device_of(module: torch.nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def _window_box(plan, r: int, c: int) -> tuple[int, int, int, int]:
    """Tile (r, c)'s window in the pass input's pixels: left, top, right, bottom."""
    x0, y0 = plan.cols.window_starts[c], plan.rows.window_starts[r]
    return x0, y0, min(x0 + plan.cols.window, plan.cols.length), min(y0 + plan.rows.window, plan.rows.length)


class TilePrompts:
    """The prompt of each tile window of one pass, made once per window (a retry with smaller tiles makes
    only the new windows' prompts). Lives for one pass of one call."""

    def __init__(self, make: Callable[[tuple[int, int, int, int]], str]):
        self._make, self._texts = make, {}

    def text(self, box: tuple[int, int, int, int]) -> str:
        if box not in self._texts:
            self._texts[box] = self._make(box)
        return self._texts[box]

    def records(self, plan) -> list[TilePrompt]:
        """The prompts of the plan that made the image, in tile order."""
        return [TilePrompt(list(box), self._texts[box], [r, c])
                for r, c in plan.tiles() if (box := _window_box(plan, r, c)) in self._texts]


def _tile_fns(upscaler: Upscaler, cond: Conditioning, prompt: Prompt, hooks: RunHooks):
    """(fn, per_tile, prompts) for the runner. Unprompted models get x only: no per-tile prompts are made for
    them (a prompt model call per tile would buy nothing); the receipt says so."""
    if not (upscaler.capabilities.prompted and callable(prompt)):
        return (lambda x: upscaler.upscale_window(x, cond, hooks).image), None, None
    prompts = TilePrompts(prompt)

    def per_tile(plan, r, c):
        tile_cond = dataclasses.replace(cond, prompt=prompts.text(_window_box(plan, r, c)))
        return lambda x: upscaler.upscale_window(x, tile_cond, hooks).image

    return None, per_tile, prompts


def _whole_image_pass(upscaler: Upscaler, rgb: torch.Tensor, device: torch.device, hooks: RunHooks,
                      prompt: Prompt, cond: Conditioning, index: int) -> tuple[torch.Tensor, PassRecord, list]:
    """Backends that plan their own tiles (latent tiles, tiled decode): one call per pass."""
    batch, height, width, _ = rgb.shape
    _prepare(upscaler, hooks, batch, height, width)
    text = None
    if upscaler.capabilities.prompted:
        text = prompt((0, 0, width, height)) if callable(prompt) else prompt
    x = rgb.permute(0, 3, 1, 2).to(device=device, dtype=torch.float32)
    result = upscaler.upscale_window(x, dataclasses.replace(cond, prompt=text), hooks)
    report = dict(result.report)
    retries = report.pop("retries", [])
    if dataclasses.is_dataclass(cond.options):
        report["options"] = dataclasses.asdict(cond.options)
    out = result.image.permute(0, 2, 3, 1).to(device=rgb.device, dtype=torch.float32)
    prompts = [TilePrompt([0, 0, width, height], text)] if text is not None else []
    record = PassRecord(index, [width, height], [out.shape[2], out.shape[1]], None, prompts, report)
    return out, record, retries


def _bytes_per_pixel(upscaler: Upscaler) -> float:
    """Working memory per input pixel of one image in the upscaler's compute dtype."""
    return upscaler.capabilities.bytes_per_pixel * torch.finfo(upscaler.dtype).bits / 32


def _prepare(upscaler: Upscaler, hooks: RunHooks, batch: int, height: int, width: int) -> None:
    """Let the host load the model with room for (at most PREPARE_PIXELS of) activations."""
    if hooks.prepare:
        hooks.prepare(int(min(height * width, PREPARE_PIXELS) * batch * _bytes_per_pixel(upscaler)))


def _one_pass(upscaler: Upscaler, rgb: torch.Tensor, tile: int, overlap: int, device: torch.device,
              hooks: RunHooks, fn, per_tile):
    caps = upscaler.capabilities
    batch, height, width, _ = rgb.shape
    per_px = _bytes_per_pixel(upscaler)
    _prepare(upscaler, hooks, batch, height, width)
    tiles_per_call, reuse, keep = 1, True, None
    if tile <= 0:
        budget = (hooks.free_bytes or free_bytes)(device) * BUDGET_FRACTION
        if device.type == "cpu":  # the output canvas shares the CPU's memory with the activations
            budget -= canvas_bytes(batch, height, width, caps.out_channels, upscaler.scale)
        # the fastest exact plan that fits, by the per-architecture cost model (tiling/cost.py)
        choice = choose_plan(height, width, batch=batch, scale=upscaler.scale, context=caps.context,
                             overlap=overlap, bytes_per_pixel=per_px, budget=int(budget),
                             cost=costs_for(arch_of(upscaler), device, caps.bytes_per_pixel),
                             multiple=caps.size_multiple, minimum=caps.min_size, square=caps.square,
                             max_tiles_per_call=max_tiles_per_call(device, per_tile),
                             reuse_factor=memory_factor(device))
        tile, tiles_per_call, reuse, keep = choice.tile, choice.tiles_per_call, choice.reuse, choice.memory
    # CPU: freed activations are reused instead of faulted in again (kept up to what the plan needs)
    with cpu_allocator.reuse(device, enabled=reuse, keep=keep):
        return run_tiled(rgb, fn, upscaler.scale, tile=tile, overlap=overlap, context=caps.context, device=device,
                         dtype=upscaler.dtype, multiple=caps.size_multiple, minimum=caps.min_size, square=caps.square,
                         hooks=hooks, per_tile=per_tile, tiles_per_call=tiles_per_call)


def upscale(upscaler: Upscaler, image: torch.Tensor, request: UpscaleRequest = UpscaleRequest(), *,
            device: torch.device | None = None, hooks: RunHooks | None = None, memo: RunMemo | None = None,
            gan: Callable[[], Upscaler] | None = None) -> tuple[torch.Tensor, UpscaleReceipt]:
    """Upscale a ComfyUI IMAGE (B,H,W,C float) as `request` asks. Returns (image, receipt).

    Scales other than the native one run the fewest native passes that reach it, then resample to
    exactly round(H*s) x round(W*s). Alpha is resampled separately and re-attached. The request's prompt,
    seed and options condition prompted backends (`capabilities.prompted`) and are recorded either way.
    Where it runs: `device`, the host's `hooks`, `memo` (a longer run, e.g. a zoom loop, shares reusable
    work across its calls) and `gan`, a factory of the GAN a diffusion run may fall back to (loaded where
    it runs).

    Before any work every intermediate and the output are checked against `request.max_side` and the free
    memory. Out of memory: tiles shrink (tiling/retry.py); at the floor a batch is split into single
    images; then the fallbacks the request allows, decided here only: "gan" after a diffusion model (with
    `gan` given), then "resize" (a plain resize); none under strict_scale. Every fallback is logged,
    listed in the receipt's "fallbacks" and flagged in its "degraded"; without one that applies the
    out-of-memory error is raised. The input image is never modified.
    """
    hooks = hooks or RunHooks()
    check_image(image)
    splan = plan_scale(upscaler.capabilities, request.scale, request.strict_scale, upscaler.source.file)
    _check_sizes(image, splan, upscaler, request.max_side, hooks)
    cond = Conditioning(seed=request.seed, options=request.options, memo=memo or RunMemo())
    started = time.perf_counter()
    chain: list[FallbackStep] = []
    candidates: list[Callable[[], Upscaler]] = [lambda: upscaler]
    allowed = () if request.strict_scale else request.fallbacks
    if "gan" in allowed and gan is not None and upscaler.capabilities.impl is Impl.DIFFUSION:
        candidates.append(gan)
    for i, candidate in enumerate(candidates):
        current = None
        try:
            current = candidate()
            # a fallback factory makes room for its own model: the hooks must not reload the first one
            run_hooks = hooks if i == 0 else dataclasses.replace(hooks, prepare=None)
            out, made = _upscale_batch(current, image, request, device=device, hooks=run_hooks, cond=cond)
        except Exception as exc:  # noqa: BLE001 - only out-of-memory falls back; the rest is re-raised
            if not (isinstance(exc, TileOOMError) or is_out_of_memory(exc, hooks.oom_errors)):
                raise
            label = current.source.file if current is not None else "fallback model"
            impl = current.capabilities.impl if current is not None else Impl.GAN
            if request.strict_scale:
                raise UpscalerError(
                    f"out of memory running impl {impl} ({label}) even with the smallest tiles, and strict_scale "
                    "forbids falling back to another method. Fix: free memory (other models), lower 'tile', use a "
                    f"smaller image, or untick strict_scale to allow the fallbacks. ({exc})"
                ) from None
            chain.append(FallbackStep(impl, label, "out of memory", str(exc)[:300]))
            last = exc
            del exc
            continue
        if chain:
            chain.append(FallbackStep(made["impl"], made["model"].file, "ok"))
        return out, _receipt(made, request, chain, started)
    if "resize" not in allowed:
        raise last
    chain.append(FallbackStep("resample", request.resample, "ok"))
    out, made = _resample_fallback(image, splan.requested, request.resample)
    return out, _receipt(made, request, chain, started)


def _receipt(made: dict, request: UpscaleRequest, chain: list[FallbackStep], started: float) -> UpscaleReceipt:
    """The one receipt of a request, built once from what made the image: the caller's policy with what
    really ran, the fallbacks (logged: never silent), the caller's notes beside the run's."""
    impl = made["impl"]
    policy = None if request.policy is None else dataclasses.replace(request.policy, ran=impl)
    notes = [*made.pop("notes"), *request.notes]
    degraded, seconds = None, made.pop("seconds")
    if chain:
        log.warning("DreamForge: %s (%s) ran out of memory; the result was made by %s instead",
                    chain[0].impl, chain[0].model, impl)
        degraded = Degraded(impl, chain[0].impl, f"out of memory: {(chain[0].detail or '')[:200]}")
        seconds = round(time.perf_counter() - started, 3)
    return UpscaleReceipt(**made, policy=policy, notes=list(dict.fromkeys(notes)), fallbacks=chain,
                          degraded=degraded, seconds=seconds)


def _check_sizes(image: torch.Tensor, splan, upscaler: Upscaler, max_side: int | None, hooks: RunHooks) -> None:
    """Every pass's output and the final image, against the max side and the free memory (size_guard)."""
    batch, height, width, channels = image.shape
    check_planned(splan, width, height, channels, batch=batch, max_side=max_side,
                  free=(hooks.free_bytes or free_bytes)(torch.device("cpu")))


def _resample_fallback(image, factor, resample) -> tuple[torch.Tensor, dict]:
    """Last resort, only where allowed: an antialiased resize to the requested size (no model); alpha kept."""
    _, height, width, channels = image.shape
    out_h, out_w = target_size(height, width, factor)
    rgb, alpha = split_alpha(image)
    out = attach_alpha(resize(rgb, out_h, out_w, resample), alpha)
    return out, dict(
        impl="resample", model=ModelRecord(resample, None, "resize (no model)", None), native_scale=1,
        requested_scale=float(factor), pass_count=0, resampled=Resampled(1.0, resample), input_size=[width, height],
        output_size=[out_w, out_h], batch=image.shape[0], alpha=ALPHA_NOTE if alpha is not None else None,
        dtype="fp32", device="cpu", passes=[], retries=[], prompt=None, seed=None, notes=[], seconds=0.0)


def _upscale_batch(upscaler: Upscaler, image: torch.Tensor, request: UpscaleRequest, **kw) -> tuple[torch.Tensor, dict]:
    """The whole batch at once; at the out-of-memory floor, one image at a time (less activation memory).
    Returns the image and what made it (the receipt's fields but the caller's)."""
    try:
        return _upscale_once(upscaler, image, request, **kw)
    except TileOOMError as exc:
        if image.shape[0] == 1:
            raise
        note = {"event": "split_batch", "batch": image.shape[0], "reason": exc.allocator or str(exc)[:200]}
    outs, made = [], []
    for i in range(image.shape[0]):
        out, one = _upscale_once(upscaler, image[i : i + 1], request, **kw)
        outs.append(out)
        made.append(one)
    # every image's passes (tiles, prompts) stay in the receipt, each saying which image it was
    passes = [dataclasses.replace(record, image=i) for i, one in enumerate(made) for record in one["passes"]]
    return torch.cat(outs, dim=0), {
        **made[0], "passes": passes, "retries": [note] + [r for one in made for r in one["retries"]],
        "batch": image.shape[0], "seconds": round(sum(one["seconds"] for one in made), 3)}


def _upscale_once(upscaler: Upscaler, image: torch.Tensor, request: UpscaleRequest, *, device: torch.device | None,
                  hooks: RunHooks, cond: Conditioning) -> tuple[torch.Tensor, dict]:
    started = time.perf_counter()
    tile, overlap, prompt = request.tile, request.overlap, request.prompt
    if tile < 0 or overlap < 0:
        raise UpscalerError(f"tile and overlap must be >= 0 (tile 0 = auto); got tile={tile}, overlap={overlap}")
    caps = upscaler.capabilities
    splan = plan_scale(caps, request.scale, request.strict_scale, upscaler.source.file)
    module = upscaler.module()
    device = device or _device_of(module)
    if not getattr(upscaler, "offload", False) and any(p.device != device for p in module.parameters()):
        module.to(device)  # with offload the backend moves one network at a time itself

    batch, height, width, _ = image.shape
    rgb, alpha = split_alpha(image)
    if caps.in_channels == 1:
        rgb = rgb.mean(dim=-1, keepdim=True)
    elif caps.in_channels != 3:
        raise UpscalerError(f"{upscaler.source.file} takes {caps.in_channels}-channel input; only 1- and 3-channel models are supported")
    if caps.prompted and not callable(prompt):
        cond = dataclasses.replace(cond, prompt=prompt)

    passes: list[PassRecord] = []
    retries: list[dict] = []
    out = rgb
    for index in range(1, splan.passes + 1):
        if caps.whole_image:
            out, record, pass_retries = _whole_image_pass(upscaler, out, device, hooks, prompt, cond, index)
        else:
            fn, per_tile, prompts = _tile_fns(upscaler, cond, prompt, hooks)
            result = _one_pass(upscaler, out, tile, overlap, device, hooks, fn, per_tile)
            if prompts:
                tile_prompts = prompts.records(result.plan)
            elif caps.prompted and cond.prompt is not None:
                tile_prompts = [TilePrompt([0, 0, out.shape[2], out.shape[1]], cond.prompt)]
            else:
                tile_prompts = []
            record = PassRecord(index, [out.shape[2], out.shape[1]], [result.image.shape[2], result.image.shape[1]],
                                result.plan.describe(), tile_prompts, {})
            out, pass_retries = result.image, result.retries
        passes.append(record)
        retries.extend(pass_retries)
    if out.shape[-1] == 1:
        out = out.expand(-1, -1, -1, 3)
    out_h, out_w = target_size(height, width, splan.requested)
    out = attach_alpha(resize(out, out_h, out_w, request.resample), alpha)

    notes = []
    if upscaler.dtype == torch.bfloat16 and device.type == "cpu" and not cpu_bf16_accelerated():
        notes.append("bf16 is emulated on this CPU (no AVX512-BF16/AMX) and runs slower than fp32")
    for record in passes:
        notes.extend(n for n in record.backend.pop("notes", []) if n not in notes)
    seed = next((p.backend["seed"] for p in passes if "seed" in p.backend), cond.seed)
    return out, dict(
        impl=caps.impl, model=ModelRecord(**upscaler.source.describe()), native_scale=splan.native,
        requested_scale=splan.requested, pass_count=splan.passes,
        resampled=Resampled(float(splan.reached), request.resample) if splan.resample else None,
        input_size=[width, height], output_size=[out_w, out_h], batch=batch,
        alpha=ALPHA_NOTE if alpha is not None else None, dtype=dtype_name(upscaler.dtype), device=str(device),
        passes=passes, retries=retries, prompt=_prompt_record(caps, prompt),
        seed=seed if (caps.prompted or seed is not None) else None, notes=notes,
        seconds=round(time.perf_counter() - started, 3))


def _prompt_record(caps, prompt: Prompt) -> PromptRecord | None:
    """How the image was conditioned on text (the texts themselves are in each pass's `prompts`)."""
    if prompt is None:
        return PromptRecord("text", None, True, "the model's default prompt") if caps.prompted else None
    mode = "per_tile" if callable(prompt) else "text"
    text = None if callable(prompt) else prompt
    if not caps.prompted:
        note = ("the model takes no prompt: no prompt was made for its tiles" if callable(prompt)
                else "the model takes no prompt: the text was not used")
        return PromptRecord(mode, text, False, note)
    if callable(prompt) and caps.whole_image:
        return PromptRecord("per_pass", None, True, "the model plans its own tiles: one prompt per pass, "
                                                    "made from the whole pass input")
    return PromptRecord(mode, text, True)
