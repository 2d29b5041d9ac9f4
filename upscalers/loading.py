"""Safe reading of model files: weights only, never pickled code; clear errors for wrong files."""
from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from .base import UpscalerError, error_text

WEIGHT_EXTENSIONS = (".pth", ".pt", ".ckpt", ".bin", ".safetensors")

# Keys by which the Stable Diffusion x4 upscaler is recognised (LDM single file and diffusers UNet).
_SD_X4_UNET_IN = ("model.diffusion_model.input_blocks.0.0.weight", "conv_in.weight")


SD_X4_MESSAGE = (
    "Stable Diffusion x4 upscaler (a diffusion model), not a GAN upscaler. Load it with DreamForge "
    "'Load Upscaler' and impl 'diffusion'; the GAN loaders cannot run it."
)


def sha256_of(path: str | os.PathLike) -> str:
    st = os.stat(path)
    return _sha256_cached(os.path.realpath(path), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=64)
def _sha256_cached(path: str, _size: int, _mtime_ns: int) -> str:  # size/mtime make edits re-hash
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A GAN checkpoint's tensors on the CPU; the SD x4 upscaler is recognised before it is read."""
    path = Path(path)
    if path.is_file() and is_sd_x4_upscaler(path):
        raise UpscalerError(f"{path.name} is the {SD_X4_MESSAGE}")
    return read_weights(path)


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a checkpoint's tensors on the CPU. .safetensors directly; pickles with weights_only."""
    path = Path(path)
    if not path.is_file():
        raise UpscalerError(f"model file not found: {path}. Put the file in ComfyUI's models/upscale_models folder.")
    ext = path.suffix.lower()
    if ext not in WEIGHT_EXTENSIONS:
        raise UpscalerError(f"{path.name}: unsupported model file type {ext!r}; expected one of {', '.join(WEIGHT_EXTENSIONS)}")
    if path.stat().st_size == 0:
        raise UpscalerError(f"{path.name} is empty (0 bytes): a download or copy did not finish. Re-download the file "
                            "or copy it again, then refresh.")
    try:
        if ext == ".safetensors":
            sd = load_file(str(path), device="cpu")
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - the weights-only unpickler raises many types on bad files
        raise UpscalerError(
            f"{path.name} could not be read as model weights ({error_text(exc)}). "
            "Only plain weight files are loaded (no pickled code): re-download the file or convert it to .safetensors."
        ) from None
    if not isinstance(sd, dict) or not sd:
        raise UpscalerError(f"{path.name} holds no state dict (got {type(sd).__name__}); it is not a model weights file")
    return sd


def is_sd_x4_upscaler(path: str | os.PathLike) -> bool:
    """True for the SD x4 upscaler: a UNet whose first conv takes 7 channels (4 latent + 3 image).

    Reads only the header (.safetensors) or the memory-mapped index of a torch zip file (.ckpt/.pth:
    weights-only, the tensor data is not read), so a folder of models is checked in moments."""
    path = Path(path)
    ext = path.suffix.lower()
    if ext in WEIGHT_EXTENSIONS and ext != ".safetensors":
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # noqa: BLE001 - not a zip-format weights file: the real load reports it
            return False
        if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
            sd = sd["state_dict"]
        return isinstance(sd, dict) and looks_like_sd_x4_state_dict(sd)
    if ext != ".safetensors":
        return False
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            for key in _SD_X4_UNET_IN:
                if key in fh.keys():
                    shape = fh.get_slice(key).get_shape()
                    return _is_x4_unet_input(key, shape)
    except Exception:  # noqa: BLE001 - an unreadable header is reported by the real load
        return False
    return False


def looks_like_sd_x4_state_dict(sd: dict) -> bool:
    for key in _SD_X4_UNET_IN:
        t = sd.get(key)
        if isinstance(t, torch.Tensor) and _is_x4_unet_input(key, tuple(t.shape)):
            return True
    return False


def _is_x4_unet_input(key: str, shape) -> bool:
    # The LDM key is unambiguous at any width; the bare diffusers name could belong to another model,
    # so there the published width (256) is required too.
    if len(shape) != 4 or shape[1] != 7:
        return False
    return key.startswith("model.diffusion_model.") or shape[0] == 256
