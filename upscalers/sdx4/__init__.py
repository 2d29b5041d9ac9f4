"""Stable Diffusion x4 upscaler backend (impl "diffusion"): diffusers components, offline loading."""
from ..contract import Backend, Impl
from .backend import DEFAULT_PROMPT, SDX4Modules, SDX4Upscaler, select_dtypes
from .detect import SD_X4_MESSAGE, is_sdx4_file, is_sdx4_folder, is_sdx4_path, is_sdx4_state_dict
from .sampler import SDX4Options

BACKEND = Backend("sdx4", Impl.DIFFUSION, detect=is_sdx4_path, load=SDX4Upscaler.load,
                  options=("tokenizer_dir", "attention_slicing", "offload"))

__all__ = ["BACKEND", "DEFAULT_PROMPT", "SDX4Modules", "SDX4Options", "SDX4Upscaler", "select_dtypes", "SD_X4_MESSAGE",
           "is_sdx4_file", "is_sdx4_folder", "is_sdx4_path", "is_sdx4_state_dict"]
