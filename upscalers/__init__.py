"""Upscaler backends behind one contract (contract.py), their families (backends.py: gan/, sdx4/,
coz_sd3/), the impl policy (impl_policy.py), the request (request.py) and its driver (upscale.py), typed receipts.

Runs without ComfyUI: tests and the command line use these modules directly.
"""
from ..runtime.errors import AssetError, UpscalerError
from .backends import backend_for, is_diffusion_model, load_model_path
from .contract import Capabilities, Conditioning, ModelSource, RunMemo, Upscaler, WindowResult
from .gan import GANUpscaler
from .impl_policy import IMPLS, plan_scale, resolve_load_impl
from .receipts import UpscaleReceipt
from .request import DEFAULT_OVERLAP, UpscaleRequest
from .upscale import check_image, upscale

__all__ = [
    "backend_for", "is_diffusion_model", "load_model_path", "AssetError", "UpscalerError", "Capabilities",
    "Conditioning", "ModelSource", "RunMemo", "Upscaler", "WindowResult", "GANUpscaler", "UpscaleReceipt", "IMPLS",
    "plan_scale", "resolve_load_impl", "DEFAULT_OVERLAP", "UpscaleRequest", "check_image", "upscale",
]
