"""Configs of Stable Diffusion 3 medium's components and the constants of the published one-step SR.

Shipped with the pack (nothing is fetched from the gated hub repository). For single files the widths
and depths are read from the weights being loaded, so the same code loads the published files and
smaller files of the same layout (the tests' tiny model).
"""
from __future__ import annotations

import torch

from ...runtime.errors import UpscalerError

# The published step (Chain-of-Zoom's osediff_sd3 inference path).
SCALING_FACTOR = 1.5305
SHIFT_FACTOR = 0.0609  # added back before decoding only: the inference path does not subtract it at encode
TIMESTEP = 1000.0  # sigma = 1: the first (and only) timestep
CLIP_TOKENS = 77
T5_TOKENS = 512  # the authors' max_sequence_length (diffusers' default is 256)
VAE_FACTOR = 8
PATCH_HEAD_WIDTH = 64  # SD3's attention heads are 64 wide
TRANSFORMER_LORA_SCALE = 1.0  # rank 4, used as W + up @ down
VAE_LORA_SCALE = 2.0  # peft r=4, lora_alpha=8

TRANSFORMER = {
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 24, "attention_head_dim": 64,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048, "out_channels": 16, "pos_embed_max_size": 192,
}
VAE = {
    "in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
    "act_fn": "silu", "latent_channels": 16, "norm_num_groups": 32, "sample_size": 1024,
    "scaling_factor": SCALING_FACTOR, "shift_factor": SHIFT_FACTOR, "use_quant_conv": False,
    "use_post_quant_conv": False,
}
# CLIP-L is OpenAI's (quick_gelu), CLIP-G is OpenCLIP bigG (gelu); both 64-wide heads.
CLIP_ACT = {"clip_l": "quick_gelu", "clip_g": "gelu"}
CLIP_PAD = {"clip_l": "<|endoftext|>", "clip_g": "!"}  # SD3's tokenizer / tokenizer_2

TRANSFORMER_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIXES = {"clip_l": "text_encoders.clip_l.transformer.", "clip_g": "text_encoders.clip_g.transformer.",
                 "t5": "text_encoders.t5xxl.transformer."}
SD3_KEY = TRANSFORMER_PREFIX + "joint_blocks.0.context_block.adaLN_modulation.1.weight"


def shape(sd: dict, key: str, name: str) -> tuple[int, ...]:
    t = sd.get(key)
    if not isinstance(t, torch.Tensor):
        raise UpscalerError(f"{name}: tensor {key} is missing; the file is not an SD3 (medium) file of the expected layout")
    return tuple(t.shape)


def transformer_config(sd: dict, name: str) -> dict:
    """SD3Transformer2DModel config from original-layout keys (without the model.diffusion_model. prefix)."""
    width, in_ch, patch, _ = shape(sd, "x_embedder.proj.weight", name)
    blocks = {int(k.split(".")[1]) for k in sd if k.startswith("joint_blocks.")}
    if any(k.startswith("joint_blocks.0.x_block.attn2.") or ".ln_q." in k for k in sd):
        raise UpscalerError(f"{name} is an SD3.5 transformer (dual attention / qk-norm); Chain-of-Zoom's LoRA "
                            "was trained on SD3 medium: use sd3_medium*.safetensors")
    positions = shape(sd, "pos_embed", name)[1]
    out = shape(sd, "final_layer.linear.weight", name)[0] // (patch * patch)
    return {
        "sample_size": TRANSFORMER["sample_size"], "patch_size": patch, "in_channels": in_ch,
        "num_layers": len(blocks), "attention_head_dim": PATCH_HEAD_WIDTH,
        "num_attention_heads": width // PATCH_HEAD_WIDTH, "joint_attention_dim": shape(sd, "context_embedder.weight", name)[1],
        "caption_projection_dim": width, "pooled_projection_dim": shape(sd, "y_embedder.mlp.0.weight", name)[1],
        "out_channels": out, "pos_embed_max_size": int(round(positions**0.5)),
    }


def vae_config(sd: dict, name: str) -> dict:
    """AutoencoderKL config from LDM-layout VAE keys (without the first_stage_model. prefix)."""
    levels = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.down.")})
    channels = [shape(sd, f"encoder.down.{i}.block.0.conv2.weight", name)[0] for i in levels]
    per_block = len({k.split(".")[4] for k in sd if k.startswith("encoder.down.0.block.")})
    latent = shape(sd, "decoder.conv_in.weight", name)[1]
    groups = VAE["norm_num_groups"] if channels[0] % VAE["norm_num_groups"] == 0 else _groups(channels[0])
    return {**VAE, "down_block_types": ["DownEncoderBlock2D"] * len(channels),
            "up_block_types": ["UpDecoderBlock2D"] * len(channels), "block_out_channels": channels,
            "layers_per_block": per_block, "latent_channels": latent, "norm_num_groups": groups}


def _groups(channels: int) -> int:
    # Narrow test files: the largest divisor of the first width up to 32 (GroupNorm needs one).
    return max(g for g in range(1, 33) if channels % g == 0)


def clip_config(sd: dict, role: str, name: str) -> dict:
    """CLIPTextConfig from transformers-layout keys starting at text_model."""
    vocab, width = shape(sd, "text_model.embeddings.token_embedding.weight", name)
    layers = len({k.split(".")[3] for k in sd if k.startswith("text_model.encoder.layers.")})
    projection = sd.get("text_projection.weight")
    return {
        "vocab_size": vocab, "hidden_size": width,
        "intermediate_size": shape(sd, "text_model.encoder.layers.0.mlp.fc1.weight", name)[0],
        "num_hidden_layers": layers, "num_attention_heads": max(1, width // PATCH_HEAD_WIDTH),
        "max_position_embeddings": shape(sd, "text_model.embeddings.position_embedding.weight", name)[0],
        "hidden_act": CLIP_ACT[role], "layer_norm_eps": 1e-5,
        "projection_dim": int(projection.shape[0]) if projection is not None else width,
        "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
    }


def t5_config(sd: dict, name: str) -> dict:
    """T5Config (v1.1 encoder) from transformers-layout keys (shared., encoder.)."""
    vocab, width = shape(sd, "shared.weight", name)
    buckets, heads = shape(sd, "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", name)
    layers = len({k.split(".")[2] for k in sd if k.startswith("encoder.block.")})
    return {
        "vocab_size": vocab, "d_model": width, "num_heads": heads, "num_layers": layers,
        "d_kv": shape(sd, "encoder.block.0.layer.0.SelfAttention.q.weight", name)[0] // heads,
        "d_ff": shape(sd, "encoder.block.0.layer.1.DenseReluDense.wi_0.weight", name)[0],
        "relative_attention_num_buckets": buckets, "relative_attention_max_distance": 128,
        "feed_forward_proj": "gated-gelu", "layer_norm_epsilon": 1e-6, "dropout_rate": 0.0,
        "is_encoder_decoder": False, "use_cache": False,
    }
