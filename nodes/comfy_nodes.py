"""ComfyUI nodes: schema -> backend call -> ComfyUI output.

The only module of the pack that imports comfy.* / folder_paths: it supplies ComfyUI's memory
manager, progress bar, interrupt and model folders to the backends as plain callbacks.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import torch
from spandrel import ImageModelDescriptor

import comfy.model_management as mm
import comfy.model_patcher
import comfy.utils
import folder_paths

from ..tiling import RunHooks
from ..upscalers import DEFAULT_OVERLAP, IMPLS, GANUpscaler, Upscaler, UpscalerError, resolve_load_impl, upscale
from ..upscalers.assets import BUNDLED_DIR
from ..upscalers.dtypes import DTYPE_NAMES
from ..tiling.resample import METHODS as RESAMPLE_METHODS
from ..zoom import COLOR_FIX_METHODS, color_fix

CATEGORY = "DreamForge/upscale"
log = logging.getLogger("dreamforge_upscale")

# The bundled Compact model shows up in every upscale-model list (ours and ComfyUI's own loader).
folder_paths.add_model_folder_path("upscale_models", str(BUNDLED_DIR))


@dataclass(frozen=True)
class UpscalerHandle:
    """What flows on an UPSCALER link: the backend plus its registration with the memory manager."""

    upscaler: Upscaler
    patcher: comfy.model_patcher.ModelPatcher


def _patcher_for(module: torch.nn.Module) -> comfy.model_patcher.ModelPatcher:
    return comfy.model_patcher.ModelPatcher(
        module, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device(),
        size=mm.module_size(module),
    )


def _hooks(patcher: comfy.model_patcher.ModelPatcher) -> RunHooks:
    bars: dict[int, comfy.utils.ProgressBar] = {}

    def progress(done: int, total: int) -> None:
        bar = bars.get(total) or bars.setdefault(total, comfy.utils.ProgressBar(total))
        bar.update_absolute(done, total)  # also a cancel point under the server

    def prepare(activation_bytes: int) -> None:
        # force_full_load: plain torch layers that do not fit would otherwise stay on the offload device
        mm.load_models_gpu([patcher], memory_required=activation_bytes, force_full_load=True)

    oom = mm.OOM_EXCEPTION if mm.OOM_EXCEPTION is not Exception else ()  # CPU builds alias it to Exception
    return RunHooks(
        progress=progress,
        check_interrupt=mm.throw_exception_if_processing_interrupted,
        oom_errors=(oom,) if oom else (),
        free_bytes=lambda device: int(mm.get_free_memory(device)),
        prepare=prepare,
    )


def _as_handle(model) -> UpscalerHandle:
    """Accept our UPSCALER or ComfyUI's UPSCALE_MODEL (a spandrel descriptor)."""
    if isinstance(model, UpscalerHandle):
        return model
    if isinstance(model, ImageModelDescriptor):
        patcher = getattr(model, "patcher", None)
        if patcher is None:  # ComfyUI 0.3.x loaders attach none; newer ones do
            patcher = model.patcher = _patcher_for(model.model)
        return UpscalerHandle(GANUpscaler.from_descriptor(model), patcher)
    raise UpscalerError(
        f"upscale_model must come from 'Load Upscaler (DreamForge)' or ComfyUI's 'Load Upscale Model'; got {type(model).__name__}"
    )


def _run_upscale(model, image, scale, tile, overlap, resample, strict_scale=False):
    handle = _as_handle(model)
    device = mm.get_torch_device()
    out, receipt = upscale(
        handle.upscaler, image, scale, tile=tile, overlap=overlap, strict_scale=strict_scale,
        resample=resample, device=device, hooks=_hooks(handle.patcher),
    )
    out = out.to(mm.intermediate_device())
    return out, json.dumps(receipt, indent=1)


def _tiling_inputs() -> dict:
    return {
        "tile": ("INT", {"default": 0, "min": 0, "max": 8192, "step": 8,
                         "tooltip": "Tile side in input pixels. 0 = auto: the largest tile that fits free memory "
                                    "(one pass when the whole image fits)."}),
        "overlap": ("INT", {"default": DEFAULT_OVERLAP, "min": 0, "max": 512, "step": 1,
                            "tooltip": "Feathered (cos²) overlap between tiles in input pixels, at least this much. "
                                       "Each tile also reads the context its architecture needs."}),
        "resample": (list(RESAMPLE_METHODS), {"default": "lanczos",
                                              "tooltip": "Filter for scales other than the model's native one."}),
    }


class LoadUpscaler:
    DESCRIPTION = ("Loads an upscaling model from models/upscale_models (any single-image model spandrel "
                   "loads: Real-ESRGAN, Compact, SwinIR, HAT, DAT...). Ships with realesr-animevideov3.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("UPSCALER", "UPSCALE_MODEL")
    RETURN_NAMES = ("upscaler", "upscale_model")
    OUTPUT_TOOLTIPS = ("For DreamForge upscale nodes.", "For ComfyUI's 'Upscale Image (using Model)'.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model_name": (folder_paths.get_filename_list("upscale_models"),
                           {"tooltip": "A file in models/upscale_models (.pth/.safetensors)."}),
            "impl": (list(IMPLS), {"default": "auto",
                                   "tooltip": "auto/gan: GAN upscaler. diffusion: Stable Diffusion x4 (later release)."}),
            "dtype": (["auto", *DTYPE_NAMES], {"default": "auto",
                                               "tooltip": "auto: fp16 on CUDA where the model allows, else bf16, "
                                                          "else fp32; fp32 on CPU."}),
        }}

    def load(self, model_name, impl, dtype):
        resolve_load_impl(impl)
        path = folder_paths.get_full_path_or_raise("upscale_models", model_name)
        upscaler = GANUpscaler.load(path, dtype=dtype, device=mm.get_torch_device())
        patcher = _patcher_for(upscaler.module())
        upscaler.descriptor.patcher = patcher  # newer ComfyUI's ImageUpscaleWithModel uses it
        return (UpscalerHandle(upscaler, patcher), upscaler.descriptor)


class ESRGANUpscale:
    DESCRIPTION = ("Upscales with a GAN model, tiled and seam-free, to any scale (native passes, then an exact "
                   "antialiased resample). Takes our UPSCALER or ComfyUI's UPSCALE_MODEL.")
    CATEGORY = CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("image", "receipt")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE",),
            "upscale_model": ("UPSCALER,UPSCALE_MODEL", {"tooltip": "From Load Upscaler or Load Upscale Model."}),
            "scale": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 16.0, "step": 0.05,
                                "tooltip": "Output/input size ratio. 0 = the model's native scale."}),
            **_tiling_inputs(),
        }}

    def run(self, image, upscale_model, scale, tile, overlap, resample):
        return _run_upscale(upscale_model, image, scale or None, tile, overlap, resample)


class TiledUpscale:
    DESCRIPTION = ("Generic tiled upscaler over any UPSCALER; strict_scale refuses scales the model cannot "
                   "reach without resampling.")
    CATEGORY = CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("image", "receipt")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE",),
            "upscaler": ("UPSCALER",),
            "scale": ("FLOAT", {"default": 4.0, "min": 0.05, "max": 16.0, "step": 0.05}),
            "strict_scale": ("BOOLEAN", {"default": False,
                                         "tooltip": "Refuse scales the model cannot produce natively (no resampling)."}),
            **_tiling_inputs(),
        }}

    def run(self, image, upscaler, scale, strict_scale, tile, overlap, resample):
        return _run_upscale(upscaler, image, scale, tile, overlap, resample, strict_scale=strict_scale)


class ColorFix:
    DESCRIPTION = ("Corrects colour shift of an upscaled image against a reference (e.g. the input): wavelet keeps "
                   "the image's detail and the reference's low frequencies; adain matches mean/std per channel.")
    CATEGORY = CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE", {"tooltip": "The image to correct (e.g. the upscaled output)."}),
            "reference": ("IMAGE", {"tooltip": "Colours to match; resized to the image first."}),
            "method": (list(COLOR_FIX_METHODS), {"default": "wavelet"}),
        }}

    def run(self, image, reference, method):
        return (color_fix(image, reference, method).to(mm.intermediate_device()),)


NODE_CLASS_MAPPINGS = {
    "DreamForgeLoadUpscaler": LoadUpscaler,
    "DreamForgeESRGANUpscale": ESRGANUpscale,
    "DreamForgeTiledUpscale": TiledUpscale,
    "DreamForgeColorFix": ColorFix,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "DreamForgeLoadUpscaler": "Load Upscaler (DreamForge)",
    "DreamForgeESRGANUpscale": "ESRGAN Upscale (DreamForge)",
    "DreamForgeTiledUpscale": "Tiled Upscale (DreamForge)",
    "DreamForgeColorFix": "Color Fix (DreamForge)",
}
