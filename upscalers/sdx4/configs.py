"""Component configs of the SD x4 upscaler, derived offline from the published x4-upscaling.yaml.

The yaml (shipped beside this module, MIT) fixes the architecture; widths are read from the weights
being loaded, so the same code loads the published file and smaller files of the same layout.
"""
from __future__ import annotations

import copy
from functools import lru_cache
from pathlib import Path

import torch
import yaml

from ...runtime.errors import UpscalerError

ORIGINAL_CONFIG = Path(__file__).with_name("x4-upscaling.yaml")
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.model."
OPENCLIP_HEAD_WIDTH = 64  # OpenCLIP text towers use 64-wide attention heads (ViT-H: 1024 / 16)

# diffusers' scheduler configs for this model (the yaml: v-parameterisation, linear_start/end on
# LDM's sqrt-linear schedule = diffusers' "scaled_linear"; the low-res augmentation schedule likewise).
SCHEDULER = {
    "_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
    "beta_schedule": "scaled_linear", "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
    "prediction_type": "v_prediction",
}
LOW_RES_SCHEDULER = {
    "_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
    "beta_schedule": "scaled_linear", "clip_sample": True, "variance_type": "fixed_small",
}
MAX_NOISE_LEVEL = 350


@lru_cache(maxsize=1)
def _original() -> dict:
    return yaml.safe_load(ORIGINAL_CONFIG.read_text())


def original_config() -> dict:
    return copy.deepcopy(_original())


def _shape(sd: dict, key: str) -> tuple[int, ...]:
    t = sd.get(key)
    if t is None:
        raise UpscalerError(f"the checkpoint lacks {key!r}: it is not a complete Stable Diffusion x4 upscaler file")
    return tuple(t.shape)


def sized_original_config(sd: dict[str, torch.Tensor]) -> dict:
    """x4-upscaling.yaml with the widths of the weights in `sd` (identical for the published file)."""
    cfg = original_config()
    unet = cfg["model"]["params"]["unet_config"]["params"]
    unet["model_channels"] = _shape(sd, UNET_PREFIX + "input_blocks.0.0.weight")[0]
    unet["context_dim"] = _shape(sd, UNET_PREFIX + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight")[1]
    dd = cfg["model"]["params"]["first_stage_config"]["params"]["ddconfig"]
    dd["ch"] = _shape(sd, VAE_PREFIX + "encoder.conv_in.weight")[0]
    dd["z_channels"] = _shape(sd, VAE_PREFIX + "decoder.conv_in.weight")[1]
    return cfg


def unet_config(cfg: dict, sd: dict) -> dict:
    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm

    config = create_unet_diffusers_config_from_ldm(cfg, sd)
    config["sample_size"] = cfg["model"]["params"]["unet_config"]["params"]["image_size"]
    return config


def vae_config(cfg: dict, sd: dict) -> dict:
    from diffusers.loaders.single_file_utils import create_vae_diffusers_config_from_ldm

    config = create_vae_diffusers_config_from_ldm(cfg, sd)
    config["scaling_factor"] = cfg["model"]["params"]["scale_factor"]
    config["sample_size"] = cfg["model"]["params"]["first_stage_config"]["params"]["ddconfig"]["resolution"]
    return config


def text_encoder_config(sd: dict[str, torch.Tensor]) -> dict:
    """CLIPTextConfig of the OpenCLIP text tower, one layer short: SD 2 reads the penultimate layer."""
    vocab, width = _shape(sd, TEXT_PREFIX + "token_embedding.weight")
    positions = _shape(sd, TEXT_PREFIX + "positional_embedding")[0]
    layers = sum(1 for k in sd if k.startswith(TEXT_PREFIX + "transformer.resblocks.") and k.endswith(".ln_1.weight"))
    hidden = _shape(sd, TEXT_PREFIX + "transformer.resblocks.0.mlp.c_fc.weight")[0]
    projection = sd.get(TEXT_PREFIX + "text_projection")
    return {
        "vocab_size": vocab, "hidden_size": width, "intermediate_size": hidden,
        "num_hidden_layers": layers - 1, "num_attention_heads": max(1, width // OPENCLIP_HEAD_WIDTH),
        "max_position_embeddings": positions, "hidden_act": "gelu", "layer_norm_eps": 1e-5,
        "projection_dim": int(projection.shape[1]) if projection is not None else width,
        "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
    }
