"""Load Chain-of-Zoom Model (DreamForge): SD3 medium + the authors' LoRA as an UPSCALER.

Chain-of-Zoom Step / Loop / Upscale and Tiled Upscale take it like any 4x upscaler. Files:
  base: models/diffusers/<SD3 medium diffusers folder>, or models/checkpoints/sd3_medium*.safetensors
        (+ clip_l / clip_g / t5xxl_* from models/text_encoders or models/clip when the checkpoint lacks them)
  LoRA: models/loras/chain-of-zoom/model_20001.pkl and vae_encoder_20001.pt (the authors' SR_LoRA / SR_VAE)
Memory: the text encoders and the transformer + VAE are two ModelPatchers, so ComfyUI's manager evicts
the encoders when the transformer needs their room; embeddings of recent prompts are memoised.
"""
from __future__ import annotations

from pathlib import Path

from ..upscalers import UpscalerError
from ..upscalers.coz_sd3 import LORA_FOLDER, TRANSFORMER_LORA, VAE_ENCODER_LORA, CoZSD3Upscaler, Residency, TokenizerDirs
from ..upscalers.coz_sd3.components import is_sd3_folder
from ..upscalers.coz_sd3.single_file import is_sd3_checkpoint
from ..upscalers.dtypes import DTYPE_NAMES
from .comfy_nodes import (
    CHECKPOINTS_PREFIX, CLIP_TOKENIZER_DIR, DIFFUSERS_PREFIX, ZOOM_CATEGORY, UpscalerHandle, _patcher_for, folder_paths, mm,
    prefixed_model_path,
)

FROM_CHECKPOINT = "(from checkpoint)"
NO_T5 = "none (no T5)"
T5_TOKENIZER_DIR = CLIP_TOKENIZER_DIR.parent / "text_encoders" / "t5_tokenizer"  # ComfyUI's bundled T5 tokenizer


def _base_names() -> list[str]:
    names = []
    if "diffusers" in folder_paths.folder_names_and_paths:
        for root in folder_paths.get_folder_paths("diffusers"):
            if Path(root).is_dir():
                names += [DIFFUSERS_PREFIX + d.name for d in sorted(Path(root).iterdir()) if d.is_dir() and is_sd3_folder(d)]
    for name in folder_paths.get_filename_list("checkpoints"):
        full = folder_paths.get_full_path("checkpoints", name)
        if full and is_sd3_checkpoint(full):  # header only
            names.append(CHECKPOINTS_PREFIX + name)
    return names


def _lora_names(wanted: str) -> list[str]:
    names = folder_paths.get_filename_list("loras")
    # the authors' file names first (models/loras/chain-of-zoom/ by convention), then any other file
    return sorted(names, key=lambda n: (Path(n).name != wanted, not n.startswith(LORA_FOLDER + "/"), n))


def _base_path(name: str) -> Path:
    path = prefixed_model_path(name, "base_model")
    if path is None:
        raise UpscalerError(f"base_model must be 'diffusers/<folder>' or 'checkpoints/<file>'; got {name!r}")
    return path


def _text_path(name: str) -> str | None:
    if name in (FROM_CHECKPOINT, NO_T5):
        return None
    return folder_paths.get_full_path_or_raise("text_encoders", name)


def _residency(text_patcher, main_patcher) -> Residency:
    """Both networks through ComfyUI's manager: loading one evicts the other when the device is short of room."""
    return Residency(
        text=lambda _bytes: mm.load_models_gpu([text_patcher], force_full_load=True),
        main=lambda activation: mm.load_models_gpu([main_patcher], memory_required=activation, force_full_load=True),
        release_text=lambda: None,  # left loaded: the manager unloads it when the transformer needs the room
    )


class LoadCoZModel:
    DESCRIPTION = ("Loads Chain-of-Zoom's own super-resolver: Stable Diffusion 3 medium with the authors' LoRA "
                   f"(models/loras/{LORA_FOLDER}/{TRANSFORMER_LORA} and {VAE_ENCODER_LORA}), merged at load. "
                   "A 4x upscaler (bicubic 4x, then one SR step) for the Chain-of-Zoom nodes and Tiled Upscale. "
                   "Offline; weights only.")
    CATEGORY = ZOOM_CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("UPSCALER",)
    RETURN_NAMES = ("upscaler",)
    OUTPUT_TOOLTIPS = ("For Chain-of-Zoom Step / Loop / Upscale and Tiled Upscale.",)

    @classmethod
    def INPUT_TYPES(cls):
        text = folder_paths.get_filename_list("text_encoders")
        return {"required": {
            "base_model": (_base_names(), {"tooltip": "SD3 medium: 'diffusers/<folder>' (models/diffusers) or "
                                                      "'checkpoints/sd3_medium*.safetensors' (models/checkpoints)."}),
            "transformer_lora": (_lora_names(TRANSFORMER_LORA), {
                "tooltip": f"The authors' SR_LoRA/{TRANSFORMER_LORA} (put it in models/loras/{LORA_FOLDER}/)."}),
            "vae_lora": (_lora_names(VAE_ENCODER_LORA), {
                "tooltip": f"The authors' SR_VAE/{VAE_ENCODER_LORA} (put it in models/loras/{LORA_FOLDER}/)."}),
            "clip_l": ([FROM_CHECKPOINT, *text], {"tooltip": "clip_l.safetensors when the checkpoint has no CLIP-L "
                                                           "(models/text_encoders or models/clip)."}),
            "clip_g": ([FROM_CHECKPOINT, *text], {"tooltip": "clip_g.safetensors when the checkpoint has no CLIP-G."}),
            "t5xxl": ([FROM_CHECKPOINT, NO_T5, *text], {
                "tooltip": "t5xxl_fp16 / fp8 file, or none: the prompt embedding then differs from the paper's "
                           "(noted in the receipt) and loading needs ~9 GB less."}),
            "dtype": (["auto", *DTYPE_NAMES], {"default": "auto",
                                               "tooltip": "Transformer precision. auto: bf16 on CUDA (fp16 text "
                                                          "encoders, fp32 VAE), fp32 on the CPU. fp32 = the paper's."}),
        }}

    def load(self, base_model, transformer_lora, vae_lora, clip_l, clip_g, t5xxl, dtype):
        base = _base_path(base_model)
        text_files = {"clip_l": _text_path(clip_l), "clip_g": _text_path(clip_g), "t5": _text_path(t5xxl)}
        upscaler = CoZSD3Upscaler.load(
            base, folder_paths.get_full_path_or_raise("loras", transformer_lora),
            folder_paths.get_full_path_or_raise("loras", vae_lora), text_files=text_files,
            tokenizer_dirs=TokenizerDirs(CLIP_TOKENIZER_DIR, T5_TOKENIZER_DIR), use_t5=t5xxl != NO_T5,
            dtype=dtype, device=mm.get_torch_device())
        main, text = _patcher_for(upscaler.module()), _patcher_for(upscaler.text_module())
        upscaler.residency = _residency(text, main)
        upscaler.text_patcher = text  # the manager keeps weak references: the upscaler keeps this one alive
        return (UpscalerHandle(upscaler, main),)


NODE_CLASS_MAPPINGS = {"DreamForgeLoadCoZModel": LoadCoZModel}
NODE_DISPLAY_NAME_MAPPINGS = {"DreamForgeLoadCoZModel": "Load Chain-of-Zoom Model (DreamForge)"}
