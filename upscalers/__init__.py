"""Upscaler backends behind one protocol, their capability descriptors and the impl policy.

Runs without ComfyUI: tests and the command line use these modules directly.
"""
from .base import Capabilities, ModelSource, Upscaler, UpscalerError
from .gan import GANUpscaler
from .registry import IMPLS, plan_scale, resolve_load_impl
from .upscale import DEFAULT_OVERLAP, check_image, upscale

__all__ = [
    "Capabilities", "ModelSource", "Upscaler", "UpscalerError", "GANUpscaler", "IMPLS", "plan_scale",
    "resolve_load_impl", "DEFAULT_OVERLAP", "check_image", "upscale",
]
