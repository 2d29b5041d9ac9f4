"""SD x4 sampling: prompt encoding, noise augmentation, DDIM denoising over latent tiles, tiled 4x decode.

Mirrors diffusers' StableDiffusionUpscalePipeline step for step (same noise draws in the same order,
same scheduler calls), so with one tile the result equals the pipeline's. Every scheduler is made
per call: set_timesteps mutates it, and one loaded model serves concurrent graphs.
"""
from __future__ import annotations

import dataclasses
import secrets
from dataclasses import dataclass

import torch

from ...runtime.dtypes import itemsize
from ...runtime.errors import UpscalerError
from ...tiling import RunHooks, choose_tile, free_bytes, shrink_on_oom
from ...tiling.exact_decode import plan_exact
from ...tiling.latent_denoise import plan_latent, predict_tiled, step_hooks
from ...tiling.memory import BUDGET_FRACTION
from ...tiling.plan import plan_tiles
from ...tiling.vae_tiles import decode_tiled
from ..vae_program import vae_decoder_program
from .components import SDX4Components

VAE_SCALE = 4  # latent = input size, output = 4x
VAE_MAX_WINDOW = 256  # latent px: the decoder's middle self-attention never sees more than 256x256 tokens
VAE_PAD = 16  # latent px of real context around a decode tile
VAE_OVERLAP = 8  # latent px of cos^2 blend between decode tiles
MIN_LATENT_TILE = 32
# Peak working memory in elements per base channel, measured on the CPU with the tiny model (UNet:
# ~35 per latent pixel per image; decoder: ~11-13 per OUTPUT pixel) and rounded up for margin.
UNET_ELEMENTS_PER_CHANNEL = 48  # per latent pixel, per image (x2 with classifier-free guidance)
VAE_ELEMENTS_PER_CHANNEL = 16  # per output pixel


@dataclass(frozen=True)
class SDX4Options:
    """Per-call settings of one SD x4 upscale."""

    steps: int = 50
    guidance: float = 7.5
    noise_level: int = 20
    negative_prompt: str = ""
    tile: int = 0  # latent (= input) px per UNet tile; 0 = auto (untiled when it fits)
    overlap: int = 32  # latent px of cos^2 blend between UNet tiles
    vae_tile: int = 0  # latent px per decode tile; 0 = auto (at most VAE_MAX_WINDOW with its padding)
    eta: float = 0.0

    def check(self, max_noise_level: int) -> None:
        if not 1 <= self.steps <= 1000:
            raise UpscalerError(f"steps must be between 1 and 1000; got {self.steps}")
        if not 0 <= self.noise_level <= max_noise_level:
            raise UpscalerError(f"noise_level must be between 0 and {max_noise_level} (the model's max_noise_level); got {self.noise_level}")
        if self.guidance < 0:
            raise UpscalerError(f"guidance must be >= 0 (1 or less disables classifier-free guidance); got {self.guidance}")
        if self.tile < 0 or self.overlap < 0 or self.vae_tile < 0:
            raise UpscalerError("tile, overlap and vae_tile must be >= 0 (0 = auto)")


def unet_bytes_per_pixel(comps: SDX4Components, dtype: torch.dtype, cfg: bool) -> float:
    return UNET_ELEMENTS_PER_CHANNEL * comps.unet.config.block_out_channels[0] * itemsize(dtype) * (2 if cfg else 1)


def vae_bytes_per_pixel(comps: SDX4Components, dtype: torch.dtype) -> float:
    return VAE_ELEMENTS_PER_CHANNEL * comps.vae.config.block_out_channels[0] * VAE_SCALE**2 * itemsize(dtype)


def _tokens(tokenizer, texts: list[str], length: int) -> torch.Tensor:
    return tokenizer(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids


def encode_prompt(comps: SDX4Components, prompt: str, negative: str, batch: int, cfg: bool,
                  device: torch.device) -> torch.Tensor:
    """[negative; positive] embeddings (2B when guiding), as the pipeline builds them."""
    text = comps.text_encoder
    ids = _tokens(comps.tokenizer, [prompt], comps.tokenizer.model_max_length).to(device)
    embeds = text(ids)[0]
    if cfg:
        neg = text(_tokens(comps.tokenizer, [negative], ids.shape[-1]).to(device))[0]
        embeds = torch.cat([neg.repeat(batch, 1, 1), embeds.repeat(batch, 1, 1)])
    else:
        embeds = embeds.repeat(batch, 1, 1)
    return embeds


def _latent_tile(comps, opts, height, width, batch, dtype, cfg, device, hooks) -> int:
    if opts.tile:
        return opts.tile
    per_px = unet_bytes_per_pixel(comps, dtype, cfg) * batch
    budget = (hooks.free_bytes or free_bytes)(device) * BUDGET_FRACTION
    return choose_tile(height, width, 1, per_px, int(budget), 0)


def denoise(comps: SDX4Components, image: torch.Tensor, embeds: torch.Tensor, opts: SDX4Options, seed: int,
            device: torch.device, dtype: torch.dtype, hooks: RunHooks) -> tuple[torch.Tensor, dict]:
    """image: B,3,h,w in 0..1 -> (latents B,4,h,w after opts.steps DDIM steps over latent tiles, its report)."""
    from diffusers import DDIMScheduler, DDPMScheduler

    cfg = opts.guidance > 1.0
    batch, _, height, width = image.shape
    scheduler = DDIMScheduler.from_config(comps.scheduler_config)
    low_res = DDPMScheduler.from_config(comps.low_res_scheduler_config)
    scheduler.set_timesteps(opts.steps, device=device)
    generator = torch.Generator("cpu").manual_seed(seed)  # CPU draws: the same image on every device

    low = (image.float() * 2 - 1).to(dtype)
    noise = torch.randn(low.shape, generator=generator, dtype=dtype).to(device)
    level = torch.tensor([opts.noise_level], dtype=torch.long, device=device)
    low = low_res.add_noise(low, noise, level)
    copies = 2 if cfg else 1
    low = torch.cat([low] * copies)
    levels = torch.cat([level] * low.shape[0])
    latents = torch.randn((batch, comps.vae.config.latent_channels, height, width), generator=generator,
                          dtype=dtype).to(device) * scheduler.init_noise_sigma

    def predict(window: torch.Tensor, t) -> torch.Tensor:
        return comps.unet(window, t, encoder_hidden_states=embeds, class_labels=levels, return_dict=False)[0]

    tile = _latent_tile(comps, opts, height, width, batch, dtype, cfg, device, hooks)
    retries: list[dict] = []
    steps = len(scheduler.timesteps)

    def tile_pixels(size: int) -> int:
        plan = plan_latent(height, width, size, opts.overlap)
        return plan.rows.window * plan.cols.window

    tile = min(tile, max(height, width)) if tile > 0 else max(height, width)  # tile 0: one tile
    for i, t in enumerate(scheduler.timesteps):
        model_in = torch.cat([latents] * copies)
        model_in = torch.cat([scheduler.scale_model_input(model_in, t), low], dim=1)

        def attempt(size: int, i=i, t=t, model_in=model_in):
            plan = plan_latent(height, width, size, opts.overlap)
            pred = predict_tiled(model_in, lambda w: predict(w, t), plan, dtype, step_hooks(hooks, i, steps, plan.count))
            return pred, size

        # A retry repeats only this step with smaller tiles: the steps already taken are kept.
        pred, tile = shrink_on_oom(attempt, tile, cost=tile_pixels, floor=min(MIN_LATENT_TILE, tile), stage="unet",
                                   device=device, retries=retries, oom_errors=hooks.oom_errors, record={"step": i})
        pred = pred.to(dtype)
        if cfg:
            uncond, text = pred.chunk(2)
            pred = uncond + opts.guidance * (text - uncond)
        latents = scheduler.step(pred, t, latents, eta=opts.eta, generator=generator, return_dict=False)[0]
    return latents, {"unet_tiles": plan_latent(height, width, tile, opts.overlap).describe(), "retries": retries}


def decode(comps: SDX4Components, latents: torch.Tensor, opts: SDX4Options, device: torch.device,
           dtype: torch.dtype, hooks: RunHooks) -> tuple[torch.Tensor, dict]:
    """latents B,4,h,w -> (image B,4h,4w,3 float32 in 0..1, its report); tiled when large (tiling/vae_tiles.py)."""
    vae = comps.vae
    z = latents.to(dtype) / vae.config.scaling_factor
    height, width = z.shape[-2:]
    per_px = vae_bytes_per_pixel(comps, dtype) * z.shape[0]
    budget = (hooks.free_bytes or free_bytes)(device) * BUDGET_FRACTION
    tile = opts.vae_tile
    if not tile:
        tile = choose_tile(height, width, 1, per_px, int(budget), VAE_PAD)
        if max(height, width) > VAE_MAX_WINDOW:
            tile = min(tile or VAE_MAX_WINDOW, VAE_MAX_WINDOW - 2 * VAE_PAD)
    # The statistics pass runs alone, so it may use the whole budget: exact statistics whenever they fit
    # (the decoder's attention is SDPA: memory linear in the latent's pixels).
    stats_side = max(1, int((budget / per_px) ** 0.5))

    def run(window: torch.Tensor) -> torch.Tensor:
        return _to_unit(vae.decode(window, return_dict=False)[0])

    norms = [m for m in vae.decoder.modules() if isinstance(m, torch.nn.GroupNorm)]
    exact, refused = None, ""
    if tile and not plan_tiles(height, width, tile, VAE_OVERLAP, VAE_PAD).untiled:
        exact, refused = plan_exact(lambda: vae_decoder_program(vae, _to_unit), run, z, tile, VAE_PAD,
                                    per_px, budget, device, dtype)
    result = decode_tiled(run, norms, z, scale=VAE_SCALE, tile=tile, overlap=VAE_OVERLAP, pad=VAE_PAD,
                          device=device, dtype=dtype, hooks=dataclasses.replace(hooks, progress=None),
                          stats_side=stats_side, exact=exact, refused=refused)
    return result.image, {"vae_tiles": {**result.plan.describe(), "statistics": result.statistics},
                          "retries": list(result.retries)}


def _to_unit(decoded: torch.Tensor) -> torch.Tensor:
    """The decoder's -1..1 output as a 0..1 image."""
    return (decoded.float() / 2 + 0.5).clamp(0, 1)


def new_seed() -> int:
    return secrets.randbits(63)
