"""The SD x4 upscaler's components, loaded from a diffusers folder or the official single file.

Everything is local: nothing is fetched from a hub (diffusers/transformers are called with
local_files_only). A missing piece is an error naming the file to put where.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ...runtime.errors import UpscalerError, error_text
from . import configs
from .detect import is_sdx4_folder

TOKENIZER_FILES = ("vocab.json", "merges.txt")


@dataclass
class SDX4Components:
    unet: torch.nn.Module  # diffusers UNet2DConditionModel, 7 input channels
    vae: torch.nn.Module  # diffusers AutoencoderKL, 4x (ch_mult 1,2,4)
    text_encoder: torch.nn.Module  # transformers CLIPTextModel (OpenCLIP tower, penultimate layer)
    tokenizer: object  # transformers CLIPTokenizer
    scheduler_config: dict = field(default_factory=lambda: dict(configs.SCHEDULER))
    low_res_scheduler_config: dict = field(default_factory=lambda: dict(configs.LOW_RES_SCHEDULER))
    max_noise_level: int = configs.MAX_NOISE_LEVEL


def has_tokenizer(folder: str | os.PathLike | None) -> bool:
    return folder is not None and (all((Path(folder) / f).is_file() for f in TOKENIZER_FILES)
                                   or (Path(folder) / "tokenizer.json").is_file())


def clip_tokenizer(folder: str | os.PathLike | None):
    """SD 2's CLIP BPE tokenizer from `folder`: vocab.json + merges.txt (padded with '!' like OpenCLIP),
    or a saved tokenizer.json (a diffusers folder's tokenizer/, which records its own padding)."""
    from transformers import CLIPTokenizer

    if has_tokenizer(folder) and not (Path(folder) / "vocab.json").is_file():
        return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    if not has_tokenizer(folder):
        where = f"in {folder}" if folder else "(no tokenizer folder was given)"
        raise UpscalerError(
            f"the CLIP tokenizer files {' and '.join(TOKENIZER_FILES)} were not found {where}. Inside ComfyUI they "
            "come from ComfyUI's comfy/sd1_tokenizer folder; outside it, pass a folder holding them (e.g. the "
            "'tokenizer' folder of the diffusers model stabilityai/stable-diffusion-x4-upscaler)."
        )
    folder = Path(folder)
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="!", model_max_length=77)


def load_diffusers_folder(path: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None) -> SDX4Components:
    """Components of a diffusers folder (unet/, vae/, text_encoder/, tokenizer/, schedulers), fp32 on the CPU."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    path = Path(path)
    if not is_sdx4_folder(path):
        raise UpscalerError(
            f"{path} is not a Stable Diffusion x4 upscaler diffusers folder (expected model_index.json naming "
            "StableDiffusionUpscalePipeline, or unet/config.json with in_channels 7)"
        )
    for part in ("unet", "vae", "text_encoder"):
        if not (path / part / "config.json").is_file():
            raise UpscalerError(f"{path.name}: {part}/config.json is missing; copy the complete {part}/ folder of the model there")
    try:
        common = dict(local_files_only=True, torch_dtype=torch.float32, low_cpu_mem_usage=False)
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **common)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **common)
        text = CLIPTextModel.from_pretrained(path / "text_encoder", local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError, RuntimeError) as exc:
        raise UpscalerError(f"{path.name}: could not load the diffusers components ({error_text(exc, 300)})") from None
    own_tokenizer = path / "tokenizer"
    tokenizer = clip_tokenizer(own_tokenizer if has_tokenizer(own_tokenizer) else tokenizer_dir)
    if unet.config.in_channels != 7:
        raise UpscalerError(f"{path.name}: its UNet takes {unet.config.in_channels} channels; the x4 upscaler's takes 7")
    comps = SDX4Components(unet, vae, text, tokenizer)
    for name, attr in (("scheduler", "scheduler_config"), ("low_res_scheduler", "low_res_scheduler_config")):
        file = path / name / "scheduler_config.json"
        if file.is_file():
            setattr(comps, attr, {**getattr(comps, attr), **json.loads(file.read_text())})
    index = path / "model_index.json"
    if index.is_file():
        comps.max_noise_level = int(json.loads(index.read_text()).get("max_noise_level", configs.MAX_NOISE_LEVEL))
    return comps
