"""SD3-medium components for Chain-of-Zoom: loaded offline from a diffusers folder (single files: single_file.py).

Tokenizers come from the folder's tokenizer*/ folders when present, else from the folders the caller
names (inside ComfyUI: its bundled CLIP BPE files and T5 tokenizer), so nothing is downloaded.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ...runtime.errors import UpscalerError, error_text
from . import configs


@dataclass
class CoZComponents:
    transformer: torch.nn.Module  # diffusers SD3Transformer2DModel
    vae: torch.nn.Module  # diffusers AutoencoderKL, 16 latent channels
    clip_l: torch.nn.Module  # transformers CLIPTextModelWithProjection
    clip_g: torch.nn.Module
    t5: torch.nn.Module | None  # transformers T5EncoderModel; None: zeros, as diffusers does without it
    tokenizers: dict  # clip_l, clip_g, t5 (None when t5 is None)
    files: list  # [{"file", "sha256"|None, "part"}] what the receipt quotes


@dataclass(frozen=True)
class TokenizerDirs:
    """Where tokenizer files are found when a model folder does not carry its own."""

    clip: str | os.PathLike | None = None  # vocab.json + merges.txt (ComfyUI: comfy/sd1_tokenizer)
    t5: str | os.PathLike | None = None  # tokenizer.json (ComfyUI: comfy/text_encoders/t5_tokenizer)


def clip_tokenizer(folder, role: str):
    from transformers import CLIPTokenizer

    folder = Path(folder) if folder else None
    if folder is not None and (folder / "tokenizer.json").is_file() and not (folder / "vocab.json").is_file():
        # a saved diffusers tokenizer/ folder records its own padding
        return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True, model_max_length=configs.CLIP_TOKENS)
    if folder is None or not ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()):
        raise UpscalerError(
            f"the CLIP tokenizer files vocab.json and merges.txt were not found in {folder or '(no folder given)'}; "
            "inside ComfyUI they come from comfy/sd1_tokenizer, outside it pass the 'tokenizer' folder of "
            "stabilityai/stable-diffusion-3-medium-diffusers"
        )
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token=configs.CLIP_PAD[role],
                         model_max_length=configs.CLIP_TOKENS)


def t5_tokenizer(folder):
    from transformers import T5TokenizerFast

    folder = Path(folder) if folder else None
    if folder is None or not (folder / "tokenizer.json").is_file():
        raise UpscalerError(
            f"the T5 tokenizer (tokenizer.json) was not found in {folder or '(no folder given)'}; inside ComfyUI it "
            "comes from comfy/text_encoders/t5_tokenizer, outside it pass the 'tokenizer_3' folder of the SD3 "
            "diffusers model"
        )
    return T5TokenizerFast.from_pretrained(str(folder), local_files_only=True, model_max_length=configs.T5_TOKENS)


def is_sd3_folder(path: str | os.PathLike) -> bool:
    path = Path(path)
    try:
        index = json.loads((path / "model_index.json").read_text())
    except (OSError, ValueError):
        return False
    return index.get("_class_name", "").startswith("StableDiffusion3")


def load_diffusers_folder(path: str | os.PathLike, dirs: TokenizerDirs, use_t5: bool = True,
                          dtypes: tuple[torch.dtype, torch.dtype, torch.dtype] = (torch.float32,) * 3) -> CoZComponents:
    """transformer/, vae/, text_encoder/, text_encoder_2/ (text_encoder_3/ optional), on the CPU in `dtypes`
    (transformer, VAE, text encoders), each loaded straight into its dtype (no random init, no fp32 copy)."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    path = Path(path)
    if not is_sd3_folder(path):
        raise UpscalerError(f"{path} is not a Stable Diffusion 3 diffusers folder (model_index.json naming "
                            "StableDiffusion3Pipeline); use stabilityai/stable-diffusion-3-medium-diffusers")
    for part in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        if not (path / part / "config.json").is_file():
            raise UpscalerError(f"{path.name}: {part}/config.json is missing; copy the complete {part}/ folder there")
    t5_there = use_t5 and (path / "text_encoder_3" / "config.json").is_file()
    try:
        main_dtype, vae_dtype, text_dtype = dtypes
        common = dict(local_files_only=True, low_cpu_mem_usage=True)
        transformer = SD3Transformer2DModel.from_pretrained(path, subfolder="transformer", torch_dtype=main_dtype,
                                                            **common)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=vae_dtype, **common)
        text = dict(local_files_only=True, dtype=text_dtype)
        clip_l = CLIPTextModelWithProjection.from_pretrained(path / "text_encoder", **text)
        clip_g = CLIPTextModelWithProjection.from_pretrained(path / "text_encoder_2", **text)
        t5 = T5EncoderModel.from_pretrained(path / "text_encoder_3", **text) if t5_there else None
    except (OSError, ValueError, RuntimeError) as exc:
        raise UpscalerError(f"{path.name}: could not load the SD3 components ({error_text(exc, 300)})") from None

    def own(sub: str, fallback):
        return path / sub if (path / sub).is_dir() else fallback

    tokenizers = {"clip_l": clip_tokenizer(own("tokenizer", dirs.clip), "clip_l"),
                  "clip_g": clip_tokenizer(own("tokenizer_2", dirs.clip), "clip_g"),
                  "t5": t5_tokenizer(own("tokenizer_3", dirs.t5)) if t5 is not None else None}
    files = [{"file": path.name, "sha256": None, "part": "diffusers folder"}]
    return CoZComponents(transformer, vae, clip_l, clip_g, t5, tokenizers, files)
