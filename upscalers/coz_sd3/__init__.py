"""Chain-of-Zoom's own super-resolver: one-step SD3 medium with the authors' LoRA (impl "diffusion")."""
from ..contract import Backend, Impl
from .backend import CoZSD3Upscaler, Residency, is_coz_base, select_dtypes
from .components import TokenizerDirs
from .lora import LORA_FOLDER, TRANSFORMER_LORA, VAE_ENCODER_LORA
from .step import CoZOptions

BACKEND = Backend("coz_sd3", Impl.DIFFUSION, detect=is_coz_base, load=CoZSD3Upscaler.load,
                  options=("transformer_lora", "vae_lora", "text_files", "tokenizer_dirs", "use_t5", "residency"))

__all__ = ["BACKEND", "CoZOptions", "CoZSD3Upscaler", "LORA_FOLDER", "Residency", "TRANSFORMER_LORA", "TokenizerDirs",
           "VAE_ENCODER_LORA", "is_coz_base", "select_dtypes"]
