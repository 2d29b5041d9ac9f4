"""GAN / feed-forward SR backend family: any single-image model spandrel loads (impl "gan")."""
from ..contract import Backend, Impl
from .backend import CONTEXT_BY_ARCH, DEFAULT_CONTEXT, GANUpscaler, capabilities_of, register_sd_x4_refusal

# spandrel recognises the architecture when it loads: any weights file is a candidate
BACKEND = Backend("gan", Impl.GAN, detect=lambda path: path.is_file(), load=GANUpscaler.load, options=("compile",))

__all__ = ["BACKEND", "CONTEXT_BY_ARCH", "DEFAULT_CONTEXT", "GANUpscaler", "capabilities_of", "register_sd_x4_refusal"]
