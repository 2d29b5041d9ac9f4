"""Tiny random Stable Diffusion x4 upscaler components, and writers for the two layouts users have.

The architecture is the published one (x4-upscaling.yaml: UNet levels 1,2,2,4 with 7 input channels
and a noise-level class embedding, a 4x VAE with ch_mult 1,2,4, an OpenCLIP-style text tower); only
the widths are small. The single-file writer is the inverse of the pack's conversion, built from
ComfyUI's own converters (an independent implementation of the LDM key layout), and checked by
loading the result into ComfyUI's LDM modules with strict=True.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch

UNET_CHANNELS = 32  # model_channels (x [1, 2, 2, 4]); GroupNorm(32) needs multiples of 32
CONTEXT_DIM = 64
VAE_CHANNELS = 32
TEXT_WIDTH = 64  # one 64-wide head, like OpenCLIP's 64-wide heads
TEXT_LAYERS = 2  # used layers (penultimate): the file holds one more, as the real one does


def _comfyui() -> Path:
    from comfy_headless import comfyui_dir  # scripts/ (on sys.path via conftest)

    return comfyui_dir()


def clip_tokenizer_dir() -> Path:
    """ComfyUI's bundled CLIP BPE files: the tokenizer the real pack uses inside ComfyUI."""
    return _comfyui() / "comfy" / "sd1_tokenizer"


def _import_comfy() -> None:
    """ComfyUI's converters and LDM modules, importable from this process (CPU only)."""
    root = str(_comfyui())
    if root not in sys.path:
        sys.path.append(root)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # comfy.ops imports the memory manager, which probes for a GPU


def build_components(seed: int = 0, unet_channels: int = UNET_CHANNELS, vae_channels: int = VAE_CHANNELS,
                     groups: int = 32, context_dim: int = CONTEXT_DIM, text_width: int = TEXT_WIDTH,
                     text_layers: int = TEXT_LAYERS, vae_attention: bool = True):
    """unet, vae, text_encoder (diffusers/transformers modules with random, non-trivial weights).

    Narrower nets (with fewer GroupNorm groups) keep the big-image memory test quick on the CPU; the
    published widths (benchmarks/real_size.py: 256, 128, context and text width 1024, 23 text layers) give
    the real model's sizes. `vae_attention=False` drops the decoder's middle self-attention, whose
    windows dominate an 8-channel decoder's time (not a real one's) where a test is about memory.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    c = unet_channels
    unet = UNet2DConditionModel(norm_num_groups=groups,
        sample_size=32, in_channels=7, out_channels=4, layers_per_block=2,
        block_out_channels=(c, 2 * c, 2 * c, 4 * c),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=context_dim, use_linear_projection=True,
        only_cross_attention=(True, True, True, False), num_class_embeds=1000,
        attention_head_dim=8,
    )
    v = vae_channels
    vae = AutoencoderKL(norm_num_groups=groups,
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=64,
        block_out_channels=(v, 2 * v, 4 * v),
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        scaling_factor=0.08333, mid_block_add_attention=vae_attention,
    )
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=text_width, intermediate_size=4 * text_width,
        num_hidden_layers=text_layers, num_attention_heads=text_width // 64, max_position_embeddings=77,
        hidden_act="gelu", projection_dim=text_width,
    ))
    # Random init leaves zero-initialised output layers in diffusers: give every tensor some signal so
    # a wrong conversion or a skipped layer changes the output.
    with torch.no_grad():
        for module in (unet, vae, text):
            for name, p in module.named_parameters():
                if p.abs().max() == 0:
                    p.normal_(0, 0.02)
    for m in (unet, vae, text):
        m.eval()
    return unet, vae, text


def write_diffusers_folder(root: Path, seed: int = 0, **sizes) -> Path:
    """The published folder layout (model_index.json, unet/, vae/, ...), with tiny weights (`sizes`: the widths
    of build_components)."""
    from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionUpscalePipeline

    pipe = pipeline(seed, **sizes)
    pipe.save_pretrained(root, safe_serialization=True)
    assert isinstance(pipe, StableDiffusionUpscalePipeline)
    assert isinstance(pipe.scheduler, DDIMScheduler) and isinstance(pipe.low_res_scheduler, DDPMScheduler)
    return root


def pipeline(seed: int = 0, **sizes):
    """diffusers' own StableDiffusionUpscalePipeline over the tiny components: the parity reference (`sizes`: the
    widths of build_components)."""
    from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionUpscalePipeline
    from transformers import CLIPTokenizer

    d = clip_tokenizer_dir()
    tokenizer = CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"), pad_token="!", model_max_length=77)
    unet, vae, text = build_components(seed, **sizes)
    scheduler = DDIMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction")
    low_res = DDPMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear", clip_sample=True,
                            variance_type="fixed_small")
    return StableDiffusionUpscalePipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                          low_res_scheduler=low_res, scheduler=scheduler, max_noise_level=350)


def _comfy_unet_config() -> dict:
    # ComfyUI's description of the x4 UNet layout (levels 1,2,2,4; attention at levels 1-3 only).
    return {
        "num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 2, 4],
        "transformer_depth": [0, 0, 1, 1, 1, 1, 1, 1], "transformer_depth_output": [0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1],
        "transformer_depth_middle": 1,
    }


def ldm_state_dict(unet, vae, text, seed: int = 0) -> dict[str, torch.Tensor]:
    """The original single-file key layout (model.diffusion_model., first_stage_model., cond_stage_model.model.)."""
    _import_comfy()
    import comfy.diffusers_convert as dc
    import comfy.utils

    sd: dict[str, torch.Tensor] = {}
    unet_sd = unet.state_dict()
    mapping = comfy.utils.unet_to_diffusers(_comfy_unet_config())
    mapping["class_embedding.weight"] = "label_emb.weight"  # num_classes=1000: an nn.Embedding in LDM
    missing = set(unet_sd) - set(mapping)
    if missing:
        raise AssertionError(f"no LDM key for {sorted(missing)[:5]}")
    for diffusers_key, ldm_key in mapping.items():
        if diffusers_key in unet_sd:
            sd["model.diffusion_model." + ldm_key] = unet_sd[diffusers_key].clone()
    for k, v in dc.convert_vae_state_dict(vae.state_dict()).items():
        # ComfyUI's map is written for SD's 4-level VAE (diffusers up_blocks.i -> up.{3-i}); this VAE
        # has 3 levels, so LDM's index is one lower.
        m = re.match(r"decoder\.up\.(\d+)\.(.*)", k)
        if m:
            k = f"decoder.up.{int(m.group(1)) - 1}.{m.group(2)}"
        sd["first_stage_model." + k] = v.clone()
    gen = torch.Generator().manual_seed(seed + 1)
    # ComfyUI's converter reads its own wrapper's keys (transformer.text_model.*); transformers 5's
    # CLIPTextModel has no text_model level.
    text_sd = {"transformer.text_model." + k.removeprefix("text_model."): v for k, v in text.state_dict().items()
               if not k.endswith("position_ids")}
    # The real file keeps OpenCLIP's last block (SD 2 uses the penultimate layer) and the projection.
    last = f"transformer.text_model.encoder.layers.{TEXT_LAYERS}."
    for k, v in list(text_sd.items()):
        if k.startswith("transformer.text_model.encoder.layers.0."):
            text_sd[k.replace("transformer.text_model.encoder.layers.0.", last)] = torch.randn(v.shape, generator=gen)
    text_sd["transformer.text_projection.weight"] = torch.randn(TEXT_WIDTH, TEXT_WIDTH, generator=gen) * 0.02
    for k, v in dc.convert_text_enc_state_dict_v20(text_sd).items():
        sd["cond_stage_model.model." + k] = v.clone()
    sd["cond_stage_model.model.logit_scale"] = torch.tensor(4.6)
    return {k: v.contiguous() for k, v in sd.items()}


def check_ldm_layout(sd: dict[str, torch.Tensor]) -> None:
    """Load the UNet and VAE parts into ComfyUI's LDM modules (strict): the keys are the real layout."""
    _import_comfy()
    from comfy.ldm.models.autoencoder import AutoencoderKL as LDMAutoencoder
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    import comfy.ops

    unet = UNetModel(
        image_size=32, in_channels=7, model_channels=UNET_CHANNELS, out_channels=4, num_res_blocks=2,
        channel_mult=[1, 2, 2, 4], num_heads=8, num_classes=1000, legacy=False,
        use_spatial_transformer=True, transformer_depth=[0, 0, 1, 1, 1, 1, 1, 1], context_dim=CONTEXT_DIM,
        use_linear_in_transformer=True, disable_self_attentions=[True, True, True, False],
        transformer_depth_middle=1, transformer_depth_output=[0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1],
        operations=comfy.ops.disable_weight_init, dtype=torch.float32, device="meta",
    )
    unet_part = {k[len("model.diffusion_model."):]: v for k, v in sd.items() if k.startswith("model.diffusion_model.")}
    unet.load_state_dict(unet_part, strict=True, assign=True)
    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
                "ch": VAE_CHANNELS, "ch_mult": [1, 2, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    vae = LDMAutoencoder(ddconfig=ddconfig, embed_dim=4)
    vae_part = {k[len("first_stage_model."):]: v for k, v in sd.items() if k.startswith("first_stage_model.")}
    vae.load_state_dict(vae_part, strict=True)


def write_single_file(path: Path, seed: int = 0) -> Path:
    """A tiny `x4-upscaler-ema.safetensors`: the same weights as write_diffusers_folder(seed)."""
    from safetensors.torch import save_file

    sd = ldm_state_dict(*build_components(seed), seed=seed)
    check_ldm_layout(sd)
    save_file(sd, str(path), metadata={"format": "pt"})
    return path


def model_index(folder: Path) -> dict:
    return json.loads((folder / "model_index.json").read_text())
