"""The one answer to "is this the Stable Diffusion x4 upscaler?", for state dicts, files and folders.

The SD x4 UNet's first convolution takes 7 channels (4 latent + 3 low-res image). In the LDM single-file
layout its key is unambiguous at any width; the bare diffusers name `conv_in.weight` could belong to
another model, so there the published width (256) is required too. Files are checked from the header
(.safetensors) or the memory-mapped index of a torch zip (.ckpt/.pth, weights-only, no tensor data read),
so a folder of models is checked in moments.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open

LDM_UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"
DIFFUSERS_UNET_IN = "conv_in.weight"
PIPELINE_CLASS = "StableDiffusionUpscalePipeline"
WEIGHT_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin", ".safetensors")

SD_X4_MESSAGE = (
    "Stable Diffusion x4 upscaler (a diffusion model), not a GAN upscaler. Load it with DreamForge "
    "'Load Upscaler' and impl 'diffusion'; the GAN loaders cannot run it."
)


def _x4_unet_input(key: str, shape) -> bool:
    shape = tuple(shape)
    if len(shape) != 4 or shape[1] != 7:
        return False
    return key == LDM_UNET_IN or shape[0] == 256


def sdx4_layout(shapes: dict) -> str | None:
    """'ldm' (the official single file), 'diffusers' (a diffusers UNet's weights) or None, from key -> shape."""
    for key, layout in ((LDM_UNET_IN, "ldm"), (DIFFUSERS_UNET_IN, "diffusers")):
        if key in shapes and _x4_unet_input(key, shapes[key]):
            return layout
    return None


def state_dict_layout(sd: dict) -> str | None:
    """sdx4_layout of a loaded state dict (a Lightning 'state_dict' wrapper is looked into)."""
    if isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    return sdx4_layout({k: tuple(sd[k].shape) for k in (LDM_UNET_IN, DIFFUSERS_UNET_IN)
                        if isinstance(sd.get(k), torch.Tensor)})


def is_sdx4_state_dict(sd: dict) -> bool:
    return state_dict_layout(sd) is not None


def is_sdx4_file(path: str | os.PathLike) -> bool:
    path = Path(path)
    ext = path.suffix.lower()
    if not path.is_file() or ext not in WEIGHT_SUFFIXES:
        return False
    if ext != ".safetensors":
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # noqa: BLE001 - not a zip-format weights file: the real load reports it
            return False
        return isinstance(sd, dict) and is_sdx4_state_dict(sd)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            keys = set(fh.keys())
            shapes = {k: fh.get_slice(k).get_shape() for k in (LDM_UNET_IN, DIFFUSERS_UNET_IN) if k in keys}
    except Exception:  # noqa: BLE001 - an unreadable header is reported by the real load
        return False
    return sdx4_layout(shapes) is not None


def is_sdx4_folder(path: str | os.PathLike) -> bool:
    """A diffusers folder of the x4 upscaler: model_index.json naming the pipeline, or a 7-channel UNet."""
    path = Path(path)
    for config, test in ((path / "model_index.json", lambda c: c.get("_class_name") == PIPELINE_CLASS),
                         (path / "unet" / "config.json", lambda c: c.get("in_channels") == 7)):
        if config.is_file():
            try:
                return bool(test(json.loads(config.read_text())))
            except (OSError, ValueError):
                return False
    return False


def is_sdx4_path(path: str | os.PathLike) -> bool:
    path = Path(path)
    return is_sdx4_folder(path) if path.is_dir() else is_sdx4_file(path)
