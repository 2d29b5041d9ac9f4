"""One upscale request end to end: validate, plan scale, tiled native passes, exact resample, receipt."""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable, Union

import torch

from ..tiling import RunHooks, TileOOMError, choose_tile, free_bytes, is_out_of_memory, resize, run_tiled, target_size
from ..tiling import cpu_memory
from ..tiling.cost import arch_of, choose_plan, costs_for, max_tiles_per_call, memory_factor
from ..tiling.memory import BUDGET_FRACTION, canvas_bytes
from .base import Upscaler, UpscalerError
from .dtypes import cpu_bf16_accelerated, dtype_name
from .registry import plan_scale
from .size_guard import check_sizes, max_side_limit

log = logging.getLogger("dreamforge_upscale")

DEFAULT_OVERLAP = 16  # input px of feathered overlap; the model's context comes on top of it
# A prompt for the upscaler: one text for the whole image, or a function of a tile's window box
# (left, top, right, bottom in input pixels of the pass) giving that tile's text.
Prompt = Union[str, Callable[[tuple[int, int, int, int]], str], None]
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


def _prompted(upscaler: Upscaler, prompt: Prompt, seed: int | None, record: list):
    """(fn, per_tile) for the runner: hand the prompt (fixed, or per tile) and the seed to the upscaler.

    Upscalers without `capabilities.takes_prompt` (GANs) get x only, and per-tile prompts are not
    made for them at all (a prompt model call per tile would buy nothing); the receipt says so.
    """
    if not upscaler.capabilities.takes_prompt:
        return upscaler.upscale_window, None

    def fn(x, text=prompt if isinstance(prompt, str) else None):
        return upscaler.upscale_window(x, prompt=text, seed=seed)

    if not callable(prompt):
        return fn, None

    def per_tile(plan, r, c):
        """The window box of tile (r, c) and its prompt, made when the runner reaches the tile."""
        x0, y0 = plan.cols.window_starts[c], plan.rows.window_starts[r]
        box = (x0, y0, min(x0 + plan.cols.window, plan.cols.length), min(y0 + plan.rows.window, plan.rows.length))
        text = prompt(box)
        if (r, c) == (0, 0):
            record.clear()  # a new plan (first attempt, or a retry after out-of-memory)
        record.append({"tile": [r, c], "window": list(box), "prompt": text})
        return lambda x: fn(x, text)

    return None, per_tile


def tiles_internally(caps) -> bool:
    """Generative backends (SD x4) plan their own tiles (latent tiles, tiled decode) and take options."""
    return caps.takes_prompt and caps.tiling == "internal"


def _generative_pass(upscaler: Upscaler, rgb: torch.Tensor, device: torch.device, hooks: RunHooks,
                     prompt: Prompt, seed: int | None, options) -> tuple[torch.Tensor, dict]:
    """Backends that take a prompt tile internally (latent tiles, tiled decode): one call per pass."""
    batch, height, width, _ = rgb.shape
    _prepare(upscaler, hooks, batch, height, width)
    text = prompt((0, 0, width, height)) if callable(prompt) else prompt
    report: dict = {}
    x = rgb.permute(0, 3, 1, 2).to(device=device, dtype=torch.float32)
    y = upscaler.upscale_window(x, prompt=text, seed=seed, options=options, hooks=hooks, report=report)
    report["prompt"] = text
    if dataclasses.is_dataclass(options):
        report["options"] = dataclasses.asdict(options)
    return y.permute(0, 2, 3, 1).to(device=rgb.device, dtype=torch.float32), report


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
    tiles_per_call = 1
    if tile <= 0:
        if caps.tiling == "internal":
            tile = 0  # the model tiles itself; outer tiling would only add seams
        else:
            budget = (hooks.free_bytes or free_bytes)(device) * BUDGET_FRACTION
            if device.type == "cpu":  # the output canvas shares the CPU's memory with the activations
                budget -= canvas_bytes(batch, height, width, caps.out_channels, upscaler.scale)
            # the fastest exact plan that fits, by the per-architecture cost model (tiling/cost.py)
            choice = choose_plan(height, width, batch=batch, scale=upscaler.scale, context=caps.context,
                                 overlap=overlap, bytes_per_pixel=per_px * memory_factor(device), budget=int(budget),
                                 cost=costs_for(arch_of(upscaler), device, caps.bytes_per_pixel),
                                 multiple=caps.size_multiple, minimum=caps.min_size, square=caps.square,
                                 max_tiles_per_call=max_tiles_per_call(device, per_tile))
            tile, tiles_per_call = choice.tile, choice.tiles_per_call
    with cpu_memory.reuse(device):  # CPU: freed activations are reused instead of faulted in again
        return run_tiled(
            rgb,
            fn,
            upscaler.scale,
            tile=tile,
            overlap=overlap,
            context=caps.context,
            device=device,
            dtype=upscaler.dtype,
            multiple=caps.size_multiple,
            minimum=caps.min_size,
            square=caps.square,
            hooks=hooks,
            per_tile=per_tile,
            tiles_per_call=tiles_per_call,
        )


def upscale(
    upscaler: Upscaler,
    image: torch.Tensor,
    scale: float | None = None,
    *,
    tile: int = 0,
    overlap: int = DEFAULT_OVERLAP,
    strict_scale: bool = False,
    resample: str = "lanczos",
    device: torch.device | None = None,
    hooks: RunHooks | None = None,
    prompt: Prompt = None,
    seed: int | None = None,
    options=None,
    fallback: Callable[[], Upscaler] | None = None,
    resample_fallback: bool = False,
    max_side: int | None = None,
) -> tuple[torch.Tensor, dict]:
    """Upscale a ComfyUI IMAGE (B,H,W,C float) by `scale` (None/0 = native). Returns (image, receipt).

    Scales other than the native one run the fewest native passes that reach it, then resample to
    exactly round(H*s) x round(W*s). Alpha is resampled separately and re-attached.
    `prompt` (text, or a function of a tile's window box giving that tile's text) and `seed` go to
    upscalers that take them (`capabilities.takes_prompt`, with their per-call `options`) and are
    recorded in the receipt either way.

    Before any work every intermediate and the output are checked against `max_side` (default:
    DREAMFORGE_MAX_SIDE) and the free memory. Out of memory: tiles shrink (tiling/retry.py); at the
    floor a batch is split into single images; then, unless `strict_scale`, `fallback()` (a GAN,
    offered for diffusion upscalers; the factory loads it where it runs) and, only when
    `resample_fallback`, a plain resize. Every fallback is logged, listed in the receipt's
    "fallbacks" and flagged in its "degraded"; without an allowed fallback the out-of-memory error is
    raised. The input image is never modified.
    """
    hooks = hooks or RunHooks()
    check_image(image)
    splan = plan_scale(upscaler.capabilities, scale, strict_scale, upscaler.source.file)
    _check_sizes(image, splan, upscaler, max_side, hooks)
    kw = dict(tile=tile, overlap=overlap, strict_scale=strict_scale, resample=resample, device=device,
              prompt=prompt, seed=seed, options=options)
    started = time.perf_counter()
    chain: list[dict] = []
    candidates: list[Callable[[], Upscaler]] = [lambda: upscaler]
    if fallback is not None and upscaler.capabilities.impl != "gan" and not strict_scale:
        candidates.append(fallback)
    for i, candidate in enumerate(candidates):
        current = None
        try:
            current = candidate()
            # a fallback factory makes room for its own model: the hooks must not reload the first one
            run_hooks = hooks if i == 0 else dataclasses.replace(hooks, prepare=None)
            out, receipt = _upscale_batch(current, image, scale, hooks=run_hooks, **kw)
        except Exception as exc:  # noqa: BLE001 - only out-of-memory falls back; the rest is re-raised
            if not (isinstance(exc, TileOOMError) or is_out_of_memory(exc, hooks.oom_errors)):
                raise
            label = current.source.file if current is not None else "fallback model"
            impl = current.capabilities.impl if current is not None else "gan"
            if strict_scale:
                raise UpscalerError(
                    f"out of memory running impl {impl} ({label}) even with the smallest tiles, and strict_scale "
                    "forbids falling back to another method. Fix: free memory (other models), lower 'tile', use a "
                    f"smaller image, or untick strict_scale to allow the fallbacks. ({exc})"
                ) from None
            chain.append({"impl": impl, "model": label, "result": "out of memory", "detail": str(exc)[:300]})
            last = exc
            del exc
            continue
        if chain:
            chain.append({"impl": receipt["impl"], "model": receipt["model"]["file"], "result": "ok"})
            _degrade(receipt, chain, started)
        return out, receipt
    if not resample_fallback:
        raise last
    out, receipt = _resample_fallback(image, splan.requested, resample, chain)
    _degrade(receipt, chain, started)
    return out, receipt


def _check_sizes(image: torch.Tensor, splan, upscaler: Upscaler, max_side: int | None, hooks: RunHooks) -> None:
    """Every pass's output and the final image, against the max side and the free memory (tiling runs on
    the compute device, but the canvases live in system memory)."""
    batch, height, width, channels = image.shape
    stages = [(f"pass {k} of {splan.passes} (x{splan.native**k})", width * splan.native**k, height * splan.native**k)
              for k in range(1, splan.passes + 1)]
    out_h, out_w = target_size(height, width, splan.requested)
    if (out_w, out_h) != stages[-1][1:]:
        stages.append(("the output", out_w, out_h))
    cpu = torch.device("cpu")
    check_sizes(stages, batch, max(3, channels), max_side=max_side or max_side_limit(),
                free=(hooks.free_bytes or free_bytes)(cpu))


def _degrade(receipt: dict, chain: list[dict], started: float) -> None:
    """A fallback ran: say so in the log and the receipt, never silently."""
    receipt["fallbacks"] = chain
    receipt["degraded"] = {"ran": receipt["impl"], "instead_of": chain[0]["impl"],
                           "reason": f"out of memory: {chain[0]['detail'][:200]}"}
    receipt["seconds"] = round(time.perf_counter() - started, 3)
    log.warning("DreamForge: %s (%s) ran out of memory; the result was made by %s instead",
                chain[0]["impl"], chain[0]["model"], receipt["impl"])


def _resample_fallback(image, factor, resample, chain) -> tuple[torch.Tensor, dict]:
    """Last resort, only where allowed: an antialiased resize to the requested size (no model); alpha kept."""
    _, height, width, channels = image.shape
    out_h, out_w = target_size(height, width, factor)
    out = resize(image if channels != 1 else image.expand(-1, -1, -1, 3), out_h, out_w, resample)
    chain.append({"impl": "resample", "model": resample, "result": "ok"})
    return out, {
        "impl": "resample", "model": {"file": resample}, "native_scale": 1, "requested_scale": factor, "passes": 0,
        "resampled": {"from_scale": 1, "method": resample}, "input_size": [width, height],
        "output_size": [out_w, out_h], "batch": image.shape[0], "alpha": "resampled" if channels == 4 else None,
        "dtype": "fp32", "device": "cpu", "tile_plan": None, "retries": [], "fallbacks": chain,
    }


def _upscale_batch(upscaler: Upscaler, image: torch.Tensor, scale, **kw) -> tuple[torch.Tensor, dict]:
    """The whole batch at once; at the out-of-memory floor, one image at a time (less activation memory)."""
    try:
        return _upscale_once(upscaler, image, scale, **kw)
    except TileOOMError as exc:
        if image.shape[0] == 1:
            raise
        note = {"event": "split_batch", "batch": image.shape[0], "reason": exc.allocator or str(exc)[:200]}
    outs, receipts = [], []
    for i in range(image.shape[0]):
        out, receipt = _upscale_once(upscaler, image[i : i + 1], scale, **kw)
        outs.append(out)
        receipts.append(receipt)
    receipt = receipts[0]
    receipt["retries"] = [note] + [r for rec in receipts for r in rec["retries"]]
    receipt["batch"] = image.shape[0]
    receipt["seconds"] = round(sum(r["seconds"] for r in receipts), 3)
    return torch.cat(outs, dim=0), receipt


def _upscale_once(
    upscaler: Upscaler,
    image: torch.Tensor,
    scale: float | None,
    *,
    tile: int,
    overlap: int,
    strict_scale: bool,
    resample: str,
    device: torch.device | None,
    hooks: RunHooks,
    prompt: Prompt,
    seed: int | None,
    options,
) -> tuple[torch.Tensor, dict]:
    started = time.perf_counter()
    if tile < 0 or overlap < 0:
        raise UpscalerError(f"tile and overlap must be >= 0 (tile 0 = auto); got tile={tile}, overlap={overlap}")
    caps = upscaler.capabilities
    splan = plan_scale(caps, scale, strict_scale, upscaler.source.file)
    module = upscaler.module()
    device = device or _device_of(module)
    if not getattr(upscaler, "offload", False) and any(p.device != device for p in module.parameters()):
        module.to(device)  # with offload the backend moves one network at a time itself

    batch, height, width, channels = image.shape
    alpha = image[..., 3:] if channels == 4 else None
    rgb = image[..., :3] if channels >= 3 else image.expand(-1, -1, -1, 3)
    if caps.in_channels == 1:
        rgb = rgb.mean(dim=-1, keepdim=True)
    elif caps.in_channels != 3:
        raise UpscalerError(f"{upscaler.source.file} takes {caps.in_channels}-channel input; only 1- and 3-channel models are supported")

    passes, retries, tile_prompts = [], [], []
    out = rgb
    for _ in range(splan.passes):
        if tiles_internally(caps):
            out, report = _generative_pass(upscaler, out, device, hooks, prompt, seed, options)
            retries.extend(report.pop("retries", []))
            passes.append(report)
            continue
        record: list = []
        fn, per_tile = _prompted(upscaler, prompt, seed, record)
        result = _one_pass(upscaler, out, tile, overlap, device, hooks, fn, per_tile)
        tile_prompts.append(record)
        out = result.image
        passes.append(result.plan.describe())
        retries.extend(result.retries)
    if out.shape[-1] == 1:
        out = out.expand(-1, -1, -1, 3)
    out_h, out_w = target_size(height, width, splan.requested)
    out = resize(out, out_h, out_w, resample)
    if alpha is not None:
        out = torch.cat([out, resize(alpha, out_h, out_w, "bicubic")], dim=-1)

    receipt = {
        "impl": caps.impl,
        "model": upscaler.source.describe(),
        "native_scale": splan.native,
        "requested_scale": splan.requested,
        "passes": splan.passes,
        "resampled": {"from_scale": splan.reached, "method": resample} if splan.resample else None,
        "input_size": [width, height],
        "output_size": [out_w, out_h],
        "batch": batch,
        "alpha": "resampled separately (bicubic)" if alpha is not None else None,
        "dtype": dtype_name(upscaler.dtype),
        "device": str(device),
        "tile_plan": passes[0] if len(passes) == 1 else passes,
        "retries": retries,
        "fallbacks": [],
        "seconds": round(time.perf_counter() - started, 3),
    }
    if prompt is not None or seed is not None:
        if not caps.takes_prompt:
            receipt["prompt"] = prompt if isinstance(prompt, str) else {
                "per_tile": [], "skipped": "the model takes no prompt: no prompt was made for its tiles"}
        elif callable(prompt) and not tiles_internally(caps):
            receipt["prompt"] = {"per_tile": tile_prompts[0] if len(tile_prompts) == 1 else tile_prompts}
        elif callable(prompt):
            receipt["prompt"] = [p.get("prompt") for p in passes]
        else:
            receipt["prompt"] = prompt
        receipt["prompt_used"] = bool(caps.takes_prompt)
        receipt["seed"] = seed
    if tiles_internally(caps):  # the seed drawn when none was given, so the image can be reproduced
        receipt["seed"] = passes[0].get("seed", seed)
        receipt["prompt_used"] = True
    if upscaler.dtype == torch.bfloat16 and device.type == "cpu" and not cpu_bf16_accelerated():
        receipt["notes"] = ["bf16 is emulated on this CPU (no AVX512-BF16/AMX) and runs slower than fp32"]
    return out, receipt
