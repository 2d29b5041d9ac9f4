"""The SD x4 upscaler behind the Upscaler protocol (impl "diffusion")."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ...assets.hashing import sha256_of
from ...assets.provenance import receipt_provenance
from ...runtime.devices import default_device
from ...runtime.dtypes import DTYPE_NAMES, dtype_name, select_dtype, vae_dtype_for
from ...runtime.errors import UpscalerError
from ...tiling import RunHooks
from ..contract import Capabilities, Conditioning, Impl, ModelSource, WindowResult, merge_reports
from ..loading import read_weights
from . import sampler
from .components import SDX4Components, load_diffusers_folder
from .detect import is_sdx4_state_dict
from .sampler import SDX4Options
from .single_file import load_single_file

DEFAULT_PROMPT = "high quality, detailed"


class SDX4Modules(torch.nn.Module):
    """One plain module holding the three networks, for memory managers (ComfyUI's ModelPatcher sets
    `.device` on what it manages, which diffusers models expose as a read-only property)."""

    def __init__(self, unet: torch.nn.Module, vae: torch.nn.Module, text_encoder: torch.nn.Module):
        super().__init__()
        self.unet, self.vae, self.text_encoder = unet, vae, text_encoder


def select_dtypes(requested: str, device: torch.device) -> tuple[torch.dtype, torch.dtype]:
    """(UNet + text encoder dtype, VAE dtype). auto: fp16 UNet on CUDA; the VAE decoder breaks in fp16."""
    unet = select_dtype(requested, device, prefer="fp16")
    return unet, vae_dtype_for(unet, device)


class SDX4Upscaler:
    """Stable Diffusion x4 upscaler: prompt-guided 4x with latent-tiled denoising and tiled decode.

    Load-time choices (weights, dtypes, attention slicing, offload) live here; every per-call setting
    (prompt, seed, steps, tiles, hooks) is passed to `upscale_window`.
    """

    def __init__(self, comps: SDX4Components, source: ModelSource, dtype: torch.dtype = torch.float32,
                 vae_dtype: torch.dtype = torch.float32, attention_slicing: bool = False, offload: bool = False):
        if vae_dtype == torch.float16:
            raise UpscalerError("the SD x4 VAE decoder produces wrong results in fp16; use fp32 or bf16 for it")
        self.comps, self.source = comps, source
        self.dtype, self.vae_dtype, self.offload = dtype, vae_dtype, offload
        for module, wanted in ((comps.unet, dtype), (comps.text_encoder, dtype), (comps.vae, vae_dtype)):
            if next(module.parameters()).dtype != wanted:
                module.to(dtype=wanted)
        if attention_slicing:
            comps.unet.set_attention_slice("auto")
        self.holder = SDX4Modules(comps.unet, comps.vae, comps.text_encoder).eval().requires_grad_(False)
        self.capabilities = Capabilities(
            impl=Impl.DIFFUSION, native_scales=(sampler.VAE_SCALE,), dtypes=DTYPE_NAMES, size_multiple=1,
            min_size=1, square=False, context=0,
            bytes_per_pixel=sampler.unet_bytes_per_pixel(comps, torch.float32, cfg=True),
            in_channels=3, out_channels=3, prompted=True, whole_image=True,
        )

    @property
    def scale(self) -> int:
        return sampler.VAE_SCALE

    def module(self) -> torch.nn.Module:
        return self.holder

    def _use(self, module: torch.nn.Module, device: torch.device, hooks: RunHooks) -> None:
        """With offload, only the network in use sits on the device; the others wait where the host
        keeps offloaded weights (ComfyUI's offload device), else in system memory."""
        if self.offload:
            parked = hooks.offload_device or torch.device("cpu")
            for m in (self.comps.unet, self.comps.vae, self.comps.text_encoder):
                if m is not module:
                    m.to(parked)
        module.to(device)

    def upscale_window(self, x: torch.Tensor, cond: Conditioning, hooks: RunHooks) -> WindowResult:
        """x: B,3,h,w in 0..1 -> B,3,4h,4w in 0..1 (float32); the report has the seed, tiles and retries."""
        opts = cond.options or SDX4Options()
        opts.check(self.comps.max_noise_level)
        seed = sampler.new_seed() if cond.seed is None else int(cond.seed)
        device = x.device
        cfg = opts.guidance > 1.0
        with torch.inference_mode():
            self._use(self.comps.text_encoder, device, hooks)
            embeds = sampler.encode_prompt(self.comps, DEFAULT_PROMPT if cond.prompt is None else cond.prompt,
                                           opts.negative_prompt, x.shape[0], cfg, device).to(self.dtype)
            self._use(self.comps.unet, device, hooks)
            latents, denoised = sampler.denoise(self.comps, x, embeds, opts, seed, device, self.dtype, hooks)
            self._use(self.comps.vae, device, hooks)
            image, decoded = sampler.decode(self.comps, latents, opts, device, self.vae_dtype, hooks)
        return WindowResult(image.permute(0, 3, 1, 2), merge_reports({"seed": seed}, denoised, decoded))

    @classmethod
    def load(cls, path: str | os.PathLike, dtype: str = "auto", device: torch.device | None = None,
             tokenizer_dir: str | os.PathLike | None = None, attention_slicing: bool = False,
             offload: bool = False) -> "SDX4Upscaler":
        """A diffusers folder or the official single file (.safetensors/.ckpt), offline."""
        path = Path(path)
        device = device or default_device()
        unet_dtype, vae_dtype = select_dtypes(dtype, device)
        if path.is_dir():
            comps = load_diffusers_folder(path, tokenizer_dir)
            source = ModelSource(path.name, None, "SD x4 upscaler (diffusers folder)", receipt_provenance(path, None))
        else:
            sd = read_weights(path)
            if not is_sdx4_state_dict(sd):
                raise UpscalerError(
                    f"{path.name} is not the Stable Diffusion x4 upscaler; impl 'diffusion' needs x4-upscaler-ema"
                    ".safetensors (models/checkpoints or models/upscale_models) or its diffusers folder (models/diffusers). "
                    "For a GAN model choose impl 'gan' or 'auto'."
                )
            comps = load_single_file(path, tokenizer_dir, sd)
            del sd
            sha = sha256_of(path)
            source = ModelSource(path.name, sha, "SD x4 upscaler (single file)", receipt_provenance(path, sha))
        return cls(comps, source, unet_dtype, vae_dtype, attention_slicing, offload)

    def describe(self) -> dict:
        return {**self.source.describe(), "impl": Impl.DIFFUSION, "native_scale": self.scale,
                "dtype": dtype_name(self.dtype), "vae_dtype": dtype_name(self.vae_dtype)}
