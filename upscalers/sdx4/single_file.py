"""The official single file (x4-upscaler-ema.safetensors, LDM key layout) -> diffusers components, offline.

Configs come from the shipped x4-upscaling.yaml sized by the weights (configs.py); the key mapping is
diffusers' own single-file converter.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ...runtime.errors import UpscalerError
from . import configs
from .components import SDX4Components, clip_tokenizer
from .detect import LDM_UNET_IN, state_dict_layout


def _load_exact(module: torch.nn.Module, converted: dict, what: str, name: str) -> None:
    own = module.state_dict()
    missing = sorted(set(own) - set(converted))
    if missing:
        raise UpscalerError(
            f"{name}: the {what} weights are incomplete ({len(missing)} tensors missing, e.g. {missing[0]}); "
            "the file is damaged or not the SD x4 upscaler: re-download x4-upscaler-ema.safetensors"
        )
    bad = [k for k in own if tuple(converted[k].shape) != tuple(own[k].shape)]
    if bad:
        raise UpscalerError(f"{name}: {what} tensor {bad[0]} has shape {tuple(converted[bad[0]].shape)}, "
                            f"expected {tuple(own[bad[0]].shape)}: not the SD x4 upscaler layout")
    module.load_state_dict({k: converted[k] for k in own}, strict=True)


def load_single_file(path: str | os.PathLike, tokenizer_dir: str | os.PathLike | None,
                     sd: dict[str, torch.Tensor] | None = None) -> SDX4Components:
    """Components from the LDM single file at `path` (its tensors in `sd` if already read), fp32 on the CPU."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint, convert_open_clip_checkpoint,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from ..loading import read_weights

    name = Path(path).name
    tokenizer = clip_tokenizer(tokenizer_dir)  # fail early: before reading gigabytes
    sd = sd if sd is not None else read_weights(path)
    if state_dict_layout(sd) != "ldm":
        raise UpscalerError(f"{name} is not the Stable Diffusion x4 upscaler single file (no 7-channel UNet at "
                            f"{LDM_UNET_IN}); a diffusers UNet's weights load from the whole diffusers folder")
    cfg = configs.sized_original_config(sd)
    unet_cfg, vae_cfg = configs.unet_config(cfg, sd), configs.vae_config(cfg, sd)
    with torch.device("meta"):  # skip random init of 900M parameters; every tensor is loaded below
        unet = UNet2DConditionModel(**unet_cfg)
        vae = AutoencoderKL(**vae_cfg)
    unet.to_empty(device="cpu")
    vae.to_empty(device="cpu")
    text = CLIPTextModel(CLIPTextConfig(**configs.text_encoder_config(sd)))  # has non-persistent buffers
    _load_exact(unet, convert_ldm_unet_checkpoint(sd, unet_cfg), "UNet", name)
    _load_exact(vae, convert_ldm_vae_checkpoint(sd, vae_cfg), "VAE", name)
    # transformers 5's CLIPTextModel has no text_model level; the layer past num_hidden_layers (OpenCLIP's
    # last block) and the projection are unused by SD 2's penultimate-layer conditioning.
    clip = {k.removeprefix("text_model."): v for k, v in convert_open_clip_checkpoint(text, sd).items()}
    _load_exact(text, clip, "text encoder", name)
    for m in (unet, vae, text):
        m.float().eval().requires_grad_(False)
    return SDX4Components(unet, vae, text, tokenizer)
