"""SD3 medium from the single files users have in ComfyUI, offline.

sd3_medium*.safetensors (MMDiT + VAE, optionally CLIP-L/G and T5 under text_encoders.*), plus
clip_l / clip_g / t5xxl_* files (models/text_encoders or models/clip) for what the checkpoint lacks.
Configs are sized from the weights (configs.py); the transformer's key mapping is diffusers' own
single-file converter, the VAE's diffusers' LDM converter.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..base import UpscalerError
from ..loading import read_weights, sha256_of
from . import configs
from .components import CoZComponents, TokenizerDirs, clip_tokenizer, t5_tokenizer

TEXT_ROLES = ("clip_l", "clip_g", "t5")


def is_sd3_checkpoint(path: str | os.PathLike) -> bool:
    """Header check: an SD3 MMDiT (adaLN modulation of 9216 = 6 x 1536 on the published model)."""
    from safetensors import safe_open

    if Path(path).suffix.lower() != ".safetensors":
        return False
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            return configs.SD3_KEY in fh.keys()
    except Exception:  # noqa: BLE001 - an unreadable header is reported by the real load
        return False


def load_exact(module: torch.nn.Module, sd: dict, what: str, name: str, optional: tuple[str, ...] = ()) -> None:
    """Every tensor of `module` from `sd` with its shape, or an error naming the first missing/misshapen one."""
    own = module.state_dict()
    missing = sorted(k for k in own if k not in sd and k not in optional)
    if missing:
        raise UpscalerError(f"{name}: the {what} weights are incomplete ({len(missing)} tensors missing, e.g. "
                            f"{missing[0]}); the file is damaged or not SD3 medium: re-download it")
    bad = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if bad:
        raise UpscalerError(f"{name}: {what} tensor {bad[0]} has shape {tuple(sd[bad[0]].shape)}, expected "
                            f"{tuple(own[bad[0]].shape)}")
    module.load_state_dict({k: sd[k].float() for k in own if k in sd}, strict=False)


def _strip(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def build_clip(sd: dict, role: str, name: str) -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    sd = dict(sd)
    if role == "clip_l" and "text_projection.weight" not in sd:
        # SD3's CLIP-L file has no projection: its pooled output is unprojected (diffusers uses identity).
        width = configs.shape(sd, "text_model.embeddings.token_embedding.weight", name)[1]
        sd["text_projection.weight"] = torch.eye(width)
    model = CLIPTextModelWithProjection(CLIPTextConfig(**configs.clip_config(sd, role, name)))
    load_exact(model, sd, role.replace("_", "-").upper(), name, optional=("text_model.embeddings.position_ids",))
    return model


def build_t5(sd: dict, name: str) -> torch.nn.Module:
    from transformers import T5Config, T5EncoderModel

    sd = {k: v for k, v in sd.items() if k != "scaled_fp8"}  # ComfyUI's fp8 marker; weights are upcast below
    model = T5EncoderModel(T5Config(**configs.t5_config(sd, name)))
    load_exact(model, sd, "T5", name, optional=("encoder.embed_tokens.weight",))  # tied to shared.weight
    return model


def _file_entry(path: Path, part: str) -> dict:
    return {"file": path.name, "sha256": sha256_of(path), "part": part}


def load_single_files(checkpoint: str | os.PathLike, text_files: dict[str, str | os.PathLike | None],
                      dirs: TokenizerDirs, use_t5: bool = True) -> CoZComponents:
    """Components from `checkpoint` and, for text encoders it lacks, `text_files` {role: path}; fp32 on the CPU."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_vae_checkpoint, convert_sd3_transformer_checkpoint_to_diffusers,
    )

    checkpoint = Path(checkpoint)
    name = checkpoint.name
    sd = read_weights(checkpoint)
    if configs.SD3_KEY not in sd:
        raise UpscalerError(f"{name} is not a Stable Diffusion 3 checkpoint (no {configs.SD3_KEY}); Chain-of-Zoom "
                            "needs sd3_medium.safetensors (or sd3_medium_incl_clips*.safetensors) in models/checkpoints")
    files = [_file_entry(checkpoint, "checkpoint")]
    mmdit = _strip(sd, configs.TRANSFORMER_PREFIX)
    t_cfg = configs.transformer_config(mmdit, name)
    with torch.device("meta"):  # skip random init; every tensor is loaded below
        transformer = SD3Transformer2DModel(**t_cfg)
    transformer.to_empty(device="cpu")
    load_exact(transformer, convert_sd3_transformer_checkpoint_to_diffusers(dict(mmdit)), "transformer", name)
    vae_cfg = configs.vae_config(_strip(sd, configs.VAE_PREFIX), name)
    vae = AutoencoderKL(**vae_cfg)
    load_exact(vae, convert_ldm_vae_checkpoint(sd, vae_cfg), "VAE", name)

    encoders = {}
    for role in TEXT_ROLES:
        inside = _strip(sd, configs.TEXT_PREFIXES[role])
        if role == "t5" and not use_t5:
            encoders[role] = None
            continue
        if inside:
            source, where = inside, name
        elif text_files.get(role):
            path = Path(text_files[role])
            source, where = read_weights(path), path.name
            files.append(_file_entry(path, role))
        elif role == "t5":
            encoders[role] = None  # optional: the receipt says the embedding differs from the paper's
            continue
        else:
            raise UpscalerError(
                f"{name} has no {role.upper().replace('_', '-')} text encoder: put {role}.safetensors in "
                "models/text_encoders (or models/clip) and choose it, or use sd3_medium_incl_clips.safetensors"
            )
        encoders[role] = build_clip(source, role, where) if role != "t5" else build_t5(source, where)
    del sd
    tokenizers = {"clip_l": clip_tokenizer(dirs.clip, "clip_l"), "clip_g": clip_tokenizer(dirs.clip, "clip_g"),
                  "t5": t5_tokenizer(dirs.t5) if encoders["t5"] is not None else None}
    return CoZComponents(transformer, vae, encoders["clip_l"], encoders["clip_g"], encoders["t5"], tokenizers, files)
