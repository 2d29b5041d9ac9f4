"""The published one-step SR, with seeded sampling and tiling the authors lack.

  x  = 2 * image - 1      (image: the low-res input on the 8-bit grid, PIL-bicubic-enlarged 4x as an 8-bit RGB
                           image, /255 - exactly the authors' input; sides padded to 16 where they are not)
  z  = posterior(vae.encode(x)).sample() * 1.5305     (no shift subtracted, as the inference path does)
  v  = transformer(z, t=1000, pooled, seq)             (sigma = 1)
  z0 = z - v
  y  = clamp(vae.decode(z0 / 1.5305 + 0.0609), -1, 1) * 0.5 + 0.5

The posterior noise is drawn on the CPU from the seed (the same image on every device) for the whole
latent at once, so tiling does not change it. Large inputs: the transformer runs on latent tiles blended
with cos^2 weights (one step: the tiles are independent predictions of v), the fewest equal windows of at
most the tile, several per call on a GPU where memory allows (docs/coz_model.md, "Tiled overhead"); the
VAE encoder and decoder
run whole whenever that fits the memory budget, and on overlapping windows with GroupNorm statistics
shared across windows (tiling/vae_tiles.py) only when it does not.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ...runtime.dtypes import itemsize
from ...runtime.errors import UpscalerError
from ...tiling import RunHooks, free_bytes, shrink_plan_on_oom
from ...tiling.cost import max_tiles_per_call
from ...tiling.exact_decode import plan_exact
from ...tiling.latent_denoise import predict_tiled
from ...tiling.memory import BUDGET_FRACTION
from ...tiling.plan import plan_tiles
from ...tiling.vae_tiles import decode_tiled
from ..contract import merge_reports
from ..vae_program import vae_decoder_program
from . import configs

ZOOM = 4
SIDE_MULTIPLE = 16  # VAE factor 8 x patch 2
SAMPLING = ("sample", "mean")
VAE_PAD = 8  # latent px of real context around a VAE window
VAE_OVERLAP = 4  # latent px of cos^2 blend between VAE windows
MIN_LATENT_TILE = 16
LATENT_UNIT = "latent px; 1 latent px = 2 input px (the 4x output / 8)"
# Working memory estimates (activations per latent pixel, elements per channel of width; rounded up
# from CPU measurements of the tiny model, not yet measured on a GPU).
TRANSFORMER_ELEMENTS_PER_CHANNEL = 24  # per latent pixel x transformer width
VAE_ELEMENTS_PER_CHANNEL = 16 * configs.VAE_FACTOR**2  # per latent pixel x first VAE width


@dataclass(frozen=True)
class CoZOptions:
    """Per-call settings of the one-step SR (latent px = output px / 8)."""

    tile: int = 0  # transformer latent tile side; 0 = auto (untiled when it fits memory and the position grid)
    overlap: int = 16  # latent px of cos^2 blend between transformer tiles (the authors' full-image script: 16)
    vae_tile: int = 0  # VAE window side in latent px when a whole VAE pass does not fit memory; 0 = auto (largest)
    sampling: str = "sample"  # "sample": the published posterior sample (seeded); "mean": the posterior mean

    def check(self) -> None:
        if self.tile < 0 or self.overlap < 0 or self.vae_tile < 0:
            raise UpscalerError(f"tile, overlap and vae_tile must be >= 0 (0 = auto); got {self.tile}, "
                                f"{self.overlap}, {self.vae_tile}")
        if self.sampling not in SAMPLING:
            raise UpscalerError(f"sampling must be one of {', '.join(SAMPLING)}; got {self.sampling!r}")

    @classmethod
    def from_any(cls, options) -> tuple["CoZOptions", str | None]:
        """Ours, or the SD x4 options Tiled Upscale sends (its tiles are in input px = 2 latent px here)."""
        if options is None or isinstance(options, cls):
            return options or cls(), None
        tile, overlap, vae_tile = (getattr(options, k, 0) for k in ("tile", "overlap", "vae_tile"))
        note = (f"{type(options).__name__}: tile/overlap/vae_tile used (halved: input px -> latent px; vae_tile "
                "only where a whole VAE pass does not fit memory); steps, guidance and noise_level do not apply "
                "to the one-step model")
        return cls.from_input_px(tile, overlap, vae_tile), note

    @classmethod
    def from_input_px(cls, tile: int = 0, overlap: int = 0, vae_tile: int = 0, sampling: str = "sample") -> "CoZOptions":
        """From a tiled upscale's settings in input px (the latent is output / 8 = input / 2); overlap 0 = default."""
        return cls(tile=tile // 2, overlap=(overlap // 2) if overlap else cls.overlap, vae_tile=vae_tile // 2,
                   sampling=sampling)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """B,3,h,w float -> B,h,w,3 uint8: rounded (half to even), clipped to 0..255 (an 8-bit state is exact)."""
    arr = np.clip(x.detach().float().cpu().permute(0, 2, 3, 1).numpy(), 0.0, 1.0) * np.float32(255.0)
    return np.rint(arr).astype(np.uint8)


def bicubic_8bit(x: torch.Tensor, factor: int) -> torch.Tensor:
    """B,3,h,w in 0..1 -> B,3,h*f,w*f: the input the authors feed their SR step.

    Their states are 8-bit RGB images and the step's input is `state.resize(..., Image.BICUBIC)` on that 8-bit
    image (PIL rounds and clips to 0..255), then ToTensor (/255); the step itself takes x 2 - 1. So: onto the 8-bit
    grid, PIL BICUBIC on mode "RGB", /255 in float32. A whole pass input is enlarged at once; tiles are cut from
    the result (a bicubic of a crop would differ at the crop's borders).
    """
    b, _, h, w = x.shape
    out = np.empty((b, h * factor, w * factor, 3), dtype=np.uint8)
    for i, arr in enumerate(to_uint8(x)):
        image = Image.fromarray(np.ascontiguousarray(arr), "RGB")
        out[i] = np.asarray(image.resize((w * factor, h * factor), Image.Resampling.BICUBIC))
    return torch.from_numpy(out).permute(0, 3, 1, 2).float().div(255.0).to(x.device)


def pad_to_multiple(x: torch.Tensor, multiple: int = SIDE_MULTIPLE) -> torch.Tensor:
    h, w = x.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    if not (ph or pw):
        return x
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode)


def _budget(hooks: RunHooks, device: torch.device) -> int:
    return int((hooks.free_bytes or free_bytes)(device) * BUDGET_FRACTION)


def transformer_bytes_per_latent_px(transformer, dtype: torch.dtype) -> float:
    width = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    return TRANSFORMER_ELEMENTS_PER_CHANNEL * width * itemsize(dtype)


def vae_bytes_per_latent_px(vae, dtype: torch.dtype) -> float:
    return VAE_ELEMENTS_PER_CHANNEL * vae.config.block_out_channels[0] * itemsize(dtype)


def max_latent_side(transformer) -> int:
    return transformer.config.pos_embed_max_size * transformer.config.patch_size


def _vae_tile(opts: CoZOptions, height: int, width: int, per_px: float, budget: int) -> tuple[int, int]:
    """(window tile, statistics side) in latent px for a VAE pass over an h x w latent; (0, 0): one whole pass.

    Whole whenever it fits the budget, whatever vae_tile asks: windows would then only add work (each
    re-reads its padding, and their statistics pass over the whole latent is itself a whole pass) and
    approximate what the whole pass computes exactly. Windows only when memory is short, the largest
    that fit (not rounded down to the pack's 32 px tile step: VAE windows need no size multiple); the
    statistics pass then runs alone, so it may use the whole budget (a subsampled latent).
    (The VAE's attention is SDPA: memory linear in the latent's pixels, so one budget covers it.)
    """
    if height * width * per_px <= budget:
        return 0, 0
    side = int((budget / per_px) ** 0.5)  # the largest window that fits, to the latent pixel: fewer windows
    return opts.vae_tile or max(MIN_LATENT_TILE, side - 2 * VAE_PAD), max(MIN_LATENT_TILE, side)


def encode(vae, x: torch.Tensor, opts: CoZOptions, seed: int, device, dtype, hooks: RunHooks) -> tuple[torch.Tensor, dict]:
    """x: B,3,H,W in [-1,1] -> (z = posterior sample (or mean) x 1.5305, float32 B,16,H/8,W/8; its report)."""
    f = configs.VAE_FACTOR
    blocks = F.pixel_unshuffle(x, f)  # B,3*64,h,w: a latent-grid view of the image, so windows align with latents
    height, width = blocks.shape[-2:]
    per_px = vae_bytes_per_latent_px(vae, dtype) * x.shape[0]
    tile, stats_side = _vae_tile(opts, height, width, per_px, _budget(hooks, device))

    def moments(window: torch.Tensor) -> torch.Tensor:
        # NCHW-contiguous as the authors' call: the tiled runner's windows are channels-last views, and the CPU's
        # channels-last convolutions round differently (1e-3 on the tiny model's latents)
        h = vae.encoder(F.pixel_shuffle(window, f).contiguous())
        if vae.quant_conv is not None:
            h = vae.quant_conv(h)
        return h.float()

    norms = [m for m in vae.encoder.modules() if isinstance(m, torch.nn.GroupNorm)]
    result = decode_tiled(moments, norms, blocks, scale=1, tile=tile, overlap=VAE_OVERLAP, pad=VAE_PAD,
                          device=device, dtype=dtype, hooks=dataclasses.replace(hooks, progress=None),
                          stats_side=stats_side)
    report = {"vae_encode_tiles": {**result.plan.describe(), "statistics": result.statistics},
              "retries": [{**r, "stage": "vae encode"} for r in result.retries]}
    mean, logvar = result.image.permute(0, 3, 1, 2).to(device).chunk(2, dim=1)
    if opts.sampling == "mean":
        z = mean
    else:
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        noise = torch.randn(mean.shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)
        z = mean + std * noise.to(device)
    return z * configs.SCALING_FACTOR, report


def transformer_tile(height: int, width: int, per_px: float, budget: int, patch: int, limit: int) -> int:
    """Auto transformer tile in latent px: 0 (one call) when the latent fits the budget and the position grid,
    else the largest window that fits both, to the patch multiple (the pack's 32 px tile step would cost an
    extra row or column of windows for nothing: windows need no other multiple)."""
    if height * width * per_px <= budget and max(height, width) <= limit:
        return 0
    side = int((max(0, budget) / per_px) ** 0.5) // patch * patch
    return max(MIN_LATENT_TILE, min(side, limit))


def tiles_per_call(count: int, window_bytes: float, budget: int, cap: int) -> int:
    """Equal windows stacked into one transformer call: as many as the budget holds, at most `cap`."""
    return max(1, min(count, cap, int(max(0, budget) // max(1.0, window_bytes))))


def predict_v(transformer, z: torch.Tensor, seq: torch.Tensor, pooled: torch.Tensor, opts: CoZOptions, device,
              dtype, hooks: RunHooks, max_per_call: int | None = None) -> tuple[torch.Tensor, dict]:
    """(v over latent tiles (cos^2-blended), float32; its report); tiles halve on out-of-memory down to MIN_LATENT_TILE.

    Equal windows go through the transformer several per call where memory allows (`max_per_call`, default
    the pack's device policy: batched on a GPU only, where it saves launches; on the CPU it is no faster);
    out of memory first halves the windows per call, then the tile (tiling/runner.py, tiling/retry.py).
    """
    batch, _, height, width = z.shape
    patch, limit = transformer.config.patch_size, max_latent_side(transformer)
    seq, pooled = seq.to(device, dtype), pooled.to(device, dtype)
    per_px = transformer_bytes_per_latent_px(transformer, dtype) * batch
    budget = _budget(hooks, device)
    tile = min(opts.tile, limit) if opts.tile else transformer_tile(height, width, per_px, budget, patch, limit)
    tile = tile or max(height, width)  # 0: one tile
    cap = max_tiles_per_call(device) if max_per_call is None else max_per_call
    retries: list[dict] = []

    def predict(window: torch.Tensor) -> torch.Tensor:
        n = window.shape[0]  # image batch x windows stacked in this call; the conditioning is one prompt
        t = torch.full((n,), configs.TIMESTEP, device=device, dtype=dtype)
        return transformer(hidden_states=window, timestep=t, encoder_hidden_states=seq.expand(n, -1, -1),
                           pooled_projections=pooled.expand(n, -1), return_dict=False)[0]

    def plan_for(size: int):
        return plan_tiles(height, width, size, opts.overlap, context=0, multiple=patch)

    def per_call_for(plan) -> int:
        # a window holds its latent px and, as tokens of patch^2 px each, the prompt's tokens
        window_bytes = per_px * (plan.rows.window * plan.cols.window + seq.shape[1] * patch**2)
        return tiles_per_call(plan.count, window_bytes, budget, cap)

    def run(plan):
        per_call = per_call_for(plan)
        return predict_tiled(z, predict, plan, dtype, hooks, per_call, retries), plan, per_call

    v, plan, per_call = shrink_plan_on_oom(plan_for, run, tile, floor=min(MIN_LATENT_TILE, tile), stage="transformer",
                                           device=device, retries=retries, oom_errors=hooks.oom_errors)
    # the nodes take tile / overlap in input px: the receipt gives the latent figures and the unit
    return v, {"transformer_tiles": {**plan.describe(), "tiles_per_call": per_call,
                                     "window_area_ratio": round(plan.window_area_ratio, 4), "unit": LATENT_UNIT},
               "retries": retries}


def decode(vae, z0: torch.Tensor, opts: CoZOptions, device, dtype, hooks: RunHooks) -> tuple[torch.Tensor, dict]:
    """z0 (scaled latent) -> (B,3,8h,8w float32 in 0..1, its report)."""
    latents = (z0 / configs.SCALING_FACTOR + configs.SHIFT_FACTOR).to(dtype)
    height, width = latents.shape[-2:]
    per_px = vae_bytes_per_latent_px(vae, dtype) * z0.shape[0]
    tile, stats_side = _vae_tile(opts, height, width, per_px, _budget(hooks, device))

    def run(window: torch.Tensor) -> torch.Tensor:
        return _to_unit(vae.decode(window.contiguous(), return_dict=False)[0])

    norms = [m for m in vae.decoder.modules() if isinstance(m, torch.nn.GroupNorm)]
    exact, refused = None, ""
    if tile:  # windows: exact in one pass where the budget and the disk allow (tiling/exact_decode.py)
        exact, refused = plan_exact(lambda: vae_decoder_program(vae, _to_unit), run, latents, tile, VAE_PAD, per_px,
                                    _budget(hooks, device), device, dtype)
    result = decode_tiled(run, norms, latents, scale=configs.VAE_FACTOR, tile=tile, overlap=VAE_OVERLAP, pad=VAE_PAD,
                          device=device, dtype=dtype, hooks=dataclasses.replace(hooks, progress=None),
                          stats_side=stats_side, exact=exact, refused=refused)
    return result.image.permute(0, 3, 1, 2), {
        "vae_decode_tiles": {**result.plan.describe(), "statistics": result.statistics},
        "retries": [{**r, "stage": "vae decode"} for r in result.retries]}


def _to_unit(decoded: torch.Tensor) -> torch.Tensor:
    """The decoder's -1..1 output as a 0..1 image."""
    return decoded.float().clamp(-1, 1) * 0.5 + 0.5


def sr_step(comps, image: torch.Tensor, seq: torch.Tensor, pooled: torch.Tensor, opts: CoZOptions, seed: int,
            device, dtype: torch.dtype, vae_dtype: torch.dtype, hooks: RunHooks) -> tuple[torch.Tensor, dict]:
    """image: B,3,H,W in 0..1 with H, W multiples of 16 (already at output size) -> (B,3,H,W in 0..1, the report
    of its stages)."""
    x = (image.float() * 2 - 1).to(device)
    z, encoded = encode(comps.vae, x, opts, seed, device, vae_dtype, hooks)
    v, predicted = predict_v(comps.transformer, z, seq, pooled, opts, device, dtype, hooks)
    image, decoded = decode(comps.vae, z - v, opts, device, vae_dtype, hooks)
    return image, merge_reports(encoded, predicted, decoded)

