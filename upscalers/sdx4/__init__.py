"""Stable Diffusion x4 upscaler backend (impl "diffusion"): diffusers components, offline loading."""
from .backend import DEFAULT_PROMPT, SDX4Modules, SDX4Upscaler, is_sdx4_path, select_dtypes
from .sampler import SDX4Options

__all__ = ["DEFAULT_PROMPT", "SDX4Modules", "SDX4Options", "SDX4Upscaler", "is_sdx4_path", "select_dtypes"]
