"""ComfyUI nodes: schema -> backend call -> ComfyUI output.

The only module of the pack that imports comfy.* / folder_paths: it supplies ComfyUI's memory
manager, progress bar, interrupt and model folders to the backends as plain callbacks.
"""
from __future__ import annotations

import json
import logging
import os
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from spandrel import ImageModelDescriptor

import comfy.model_management as mm
import comfy.model_patcher
import comfy.utils
import folder_paths

from ..tiling import RunHooks
from ..upscalers import DEFAULT_OVERLAP, IMPLS, GANUpscaler, Upscaler, UpscalerError, resolve_load_impl, upscale
from ..upscalers import discovery
from ..upscalers.gan import register_sd_x4_refusal
from ..upscalers.loading import is_sd_x4_upscaler
from ..upscalers.registry import choose_run, default_impl, pick_gan, strict_scale_error
from ..upscalers.sdx4 import DEFAULT_PROMPT, SDX4Options, SDX4Upscaler, is_sdx4_path
from ..upscalers.sdx4.components import is_sdx4_folder
from ..upscalers.assets import BUNDLED_DIR, BUNDLED_MODEL
from ..upscalers.catalog import FOLDERS as ASSET_FOLDERS
from ..upscalers.dtypes import DTYPE_NAMES
from ..tiling.resample import METHODS as RESAMPLE_METHODS
from ..zoom import COLOR_FIX_METHODS, color_fix

CATEGORY = "DreamForge/upscale"
log = logging.getLogger("dreamforge_upscale")

# The bundled Compact model shows up in every upscale-model list (ours and ComfyUI's own loader).
folder_paths.add_model_folder_path("upscale_models", str(BUNDLED_DIR))
# What `assets prefetch` installed outside ComfyUI (DF_MODELS_ROOT or ~/.cache/dreamforge-upscale/models),
# after ComfyUI's own folders (the prompt-model folder "LLM" is registered in the zoom section below).
for _kind in ASSET_FOLDERS:
    folder_paths.add_model_folder_path(_kind, str(discovery.models_root() / _kind))
# ComfyUI's own 'Load Upscale Model' (spandrel) then names the SD x4 file and says what to use instead.
register_sd_x4_refusal()
# SD x4's CLIP tokenizer: ComfyUI's bundled BPE files (the SD 1/2 vocabulary), so nothing is downloaded.
CLIP_TOKENIZER_DIR = Path(comfy.utils.__file__).resolve().parent / "sd1_tokenizer"
DIFFUSERS_PREFIX, CHECKPOINTS_PREFIX = "diffusers/", "checkpoints/"


def _asset_locations(strict: bool = True) -> discovery.Locations:
    """Model discovery over ComfyUI's folder lists (extra_model_paths.yaml included) + DF_LOCAL_MIRROR."""
    def folders(kind: str) -> list[Path]:
        known = kind in folder_paths.folder_names_and_paths
        return [Path(p) for p in folder_paths.get_folder_paths(kind)] if known else []

    try:
        mirror = discovery.mirror_dir()
    except UpscalerError:
        if strict:
            raise
        log.warning("DreamForge: %s=%r is not a folder; ignored", discovery.ENV_MIRROR, os.environ.get(discovery.ENV_MIRROR))
        mirror = None
    return discovery.Locations(folders, mirror)


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


def _hooks(handle: "UpscalerHandle | None" = None) -> RunHooks:
    """ComfyUI's progress bar, interrupt, memory manager and offload device as backend callbacks."""
    bars: dict[int, comfy.utils.ProgressBar] = {}

    def progress(done: int, total: int) -> None:
        bar = bars.get(total) or bars.setdefault(total, comfy.utils.ProgressBar(total))
        bar.update_absolute(done, total)  # also a cancel point under the server

    def prepare(activation_bytes: int) -> None:
        patcher = handle.patcher
        if handle.upscaler.offload:  # the backend moves one network at a time; room for the largest + activations
            largest = max(mm.module_size(m) for m in patcher.model.children())
            mm.free_memory(activation_bytes + largest, mm.get_torch_device())
            return
        # force_full_load: plain torch layers that do not fit would otherwise stay on the offload device
        mm.load_models_gpu([patcher], memory_required=activation_bytes, force_full_load=True)

    oom = mm.OOM_EXCEPTION if mm.OOM_EXCEPTION is not Exception else ()  # CPU builds alias it to Exception
    return RunHooks(
        progress=progress,
        check_interrupt=mm.throw_exception_if_processing_interrupted,
        oom_errors=(oom,) if oom else (),
        free_bytes=lambda device: int(mm.get_free_memory(device)),
        prepare=prepare if handle is not None else None,
        offload_device=mm.unet_offload_device(),
    )


# ComfyUI 0.3.x's own loader attaches no patcher to its UPSCALE_MODEL: one per model, kept beside it
# (never written onto the user's object), so the memory manager sees the same model every run.
_CORE_PATCHERS: "weakref.WeakKeyDictionary[torch.nn.Module, comfy.model_patcher.ModelPatcher]" = weakref.WeakKeyDictionary()


def _as_handle(model) -> UpscalerHandle:
    """Accept our UPSCALER or ComfyUI's UPSCALE_MODEL (a spandrel descriptor, used as it is: not copied,
    not changed)."""
    if isinstance(model, UpscalerHandle):
        return model
    if isinstance(model, ImageModelDescriptor):
        patcher = getattr(model, "patcher", None)  # newer ComfyUI loaders attach one
        if patcher is None:
            patcher = _CORE_PATCHERS.get(model.model)
            if patcher is None:
                patcher = _CORE_PATCHERS[model.model] = _patcher_for(model.model)
        return UpscalerHandle(GANUpscaler.from_descriptor(model), patcher)
    raise UpscalerError(
        f"upscale_model must come from 'Load Upscaler (DreamForge)' or ComfyUI's 'Load Upscale Model'; got {type(model).__name__}"
    )


def _run_upscale(handle: UpscalerHandle, image, scale, tile, overlap, resample, strict_scale=False, *,
                 prompt=None, seed=None, options=None, extra: dict | None = None, fallbacks: bool = False):
    """Run the handle's upscaler with ComfyUI's hooks. `fallbacks`: on out-of-memory at the smallest
    tiles a diffusion run may fall back to a GAN, then to Lanczos (never under strict_scale); the node
    then also reports the degraded result to the UI / API client besides the receipt and the log."""
    upscaler = handle.upscaler
    device = mm.get_torch_device()
    fallback = None
    if fallbacks and upscaler.capabilities.impl == "diffusion":
        def fallback() -> Upscaler:
            gan = _folder_gan(4)
            mm.load_models_gpu([gan.patcher], force_full_load=True)  # unloads the diffusion model if needed
            return gan.upscaler
    out, receipt = upscale(
        upscaler, image, scale, tile=tile, overlap=overlap, strict_scale=strict_scale, resample=resample,
        device=device, hooks=_hooks(handle), prompt=prompt, seed=seed, options=options, fallback=fallback,
        resample_fallback=fallbacks,
    )
    if extra:
        receipt.update(extra)
        if "policy" in extra and receipt.get("degraded"):
            receipt["policy"] = {**extra["policy"], "ran": receipt["impl"]}  # what really made the image
    result = (out.to(mm.intermediate_device()), json.dumps(receipt, indent=1))
    if receipt.get("degraded"):
        return {"ui": {"dreamforge_degraded": [receipt["degraded"]]}, "result": result}
    return result


_GANS: dict[tuple[str, int], UpscalerHandle] = {}  # the GAN that auto/gan/fallback runs load from the folders


def _folder_gan(native: int) -> UpscalerHandle:
    """A GAN from models/upscale_models for a run that needs one: x2plus for 2x (else a x4 GAN), Real-ESRGAN
    x4plus for 4x, else any file named x2/x4, else the bundled model. Loaded once per file version."""
    names = [n for n in folder_paths.get_filename_list("upscale_models")
             if not is_sd_x4_upscaler(folder_paths.get_full_path("upscale_models", n) or "")]
    name = pick_gan(names, native) or BUNDLED_MODEL
    path = Path(folder_paths.get_full_path_or_raise("upscale_models", name))
    key = (str(path), path.stat().st_mtime_ns)
    if key not in _GANS:
        _GANS.clear()
        _GANS[key] = _load(path, "gan", "auto")
    return _GANS[key]


def declared_input_errors(node_cls, values: dict) -> str | None:
    """ComfyUI's own min/max/choice checks for the given widget values (None: linked, checked at run time),
    for a VALIDATE_INPUTS that names those inputs and so switches ComfyUI's checks off for them."""
    declared = node_cls.INPUT_TYPES()
    specs = {**declared.get("required", {}), **declared.get("optional", {})}
    for name, value in values.items():
        if value is None or name not in specs:
            continue
        kind, options = specs[name][0], (specs[name][1] if len(specs[name]) > 1 else {})
        if isinstance(kind, list):
            if value not in kind:
                return f"{name}: {value!r} is not one of {', '.join(map(str, kind))}"
            continue
        if kind in ("INT", "FLOAT") and (isinstance(value, bool) or not isinstance(value, (int, float))):
            return f"{name}: expected a number, got {value!r}"
        if kind == "BOOLEAN" and not isinstance(value, bool):
            return f"{name}: expected true or false, got {value!r}"
        if "min" in options and value < options["min"]:
            return f"{name}: {value} is smaller than the minimum {options['min']}"
        if "max" in options and value > options["max"]:
            return f"{name}: {value} is bigger than the maximum {options['max']}"
    return None


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


def _default_impl() -> str:
    """DREAMFORGE_DEFAULT_IMPL, or auto with a warning when it is misspelt (the node list must still load)."""
    try:
        return default_impl()
    except UpscalerError as exc:
        log.warning("DreamForge: %s; using 'auto'", exc)
        return "auto"


def _diffusion_model_names() -> list[str]:
    """SD x4 upscalers outside models/upscale_models: diffusers folders and single files in checkpoints."""
    names = []
    for root in folder_paths.get_folder_paths("diffusers") if "diffusers" in folder_paths.folder_names_and_paths else []:
        if os.path.isdir(root):
            names += [DIFFUSERS_PREFIX + d.name for d in sorted(Path(root).iterdir()) if d.is_dir() and is_sdx4_folder(d)]
    for name in folder_paths.get_filename_list("checkpoints"):
        full = folder_paths.get_full_path("checkpoints", name)
        if full and name.lower().endswith(".safetensors") and is_sd_x4_upscaler(full):  # header only
            names.append(CHECKPOINTS_PREFIX + name)
    return names


def prefixed_model_path(model_name: str, what: str) -> Path | None:
    """'diffusers/<folder>' (models/diffusers) or 'checkpoints/<file>' (models/checkpoints) -> its path;
    None for any other name."""
    if model_name.startswith(DIFFUSERS_PREFIX):
        name = model_name[len(DIFFUSERS_PREFIX):]
        for root in folder_paths.get_folder_paths("diffusers"):
            if (Path(root) / name).is_dir():
                return Path(root) / name
        raise UpscalerError(f"{what}: diffusers folder {name!r} not found in models/diffusers; put the model's folder there")
    if model_name.startswith(CHECKPOINTS_PREFIX):
        return Path(folder_paths.get_full_path_or_raise("checkpoints", model_name[len(CHECKPOINTS_PREFIX):]))
    return None


def _model_path(model_name: str) -> Path:
    return (prefixed_model_path(model_name, "model_name")
            or discovery.locate(model_name, "upscale_models", _asset_locations()).path)  # mirror > folders > cache


def _load(path: Path, impl: str, dtype: str, attention_slicing: bool = False, cpu_offload: bool = False) -> UpscalerHandle:
    kind = resolve_load_impl(impl, is_sdx4_path(path), path.name)
    device = mm.get_torch_device()
    if kind == "diffusion":
        upscaler = SDX4Upscaler.load(path, dtype=dtype, device=device, tokenizer_dir=CLIP_TOKENIZER_DIR,
                                     attention_slicing=attention_slicing, offload=cpu_offload)
        return UpscalerHandle(upscaler, _patcher_for(upscaler.module()))
    upscaler = GANUpscaler.load(path, dtype=dtype, device=device)
    patcher = _patcher_for(upscaler.module())
    upscaler.descriptor.patcher = patcher  # newer ComfyUI's ImageUpscaleWithModel uses it
    return UpscalerHandle(upscaler, patcher)


class LoadUpscaler:
    DESCRIPTION = ("Loads an upscaler: a GAN from models/upscale_models (any single-image model spandrel loads: "
                   "Real-ESRGAN, Compact, SwinIR, HAT, DAT...; ships with realesr-animevideov3), or the Stable "
                   "Diffusion x4 upscaler (a diffusers folder in models/diffusers, or x4-upscaler-ema.safetensors "
                   "in models/checkpoints or models/upscale_models), fully offline.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("UPSCALER", "UPSCALE_MODEL")
    RETURN_NAMES = ("upscaler", "upscale_model")
    OUTPUT_TOOLTIPS = ("For DreamForge upscale nodes.",
                       "For ComfyUI's 'Upscale Image (using Model)' (GAN models only; empty for SD x4).")

    @classmethod
    def INPUT_TYPES(cls):
        names = discovery.model_names("upscale_models", _asset_locations(strict=False),
                                      folder_paths.get_filename_list("upscale_models"))
        return {"required": {
            "model_name": (names + _diffusion_model_names(),
                           {"tooltip": "A GAN file in models/upscale_models (or the local mirror / runtime cache), "
                                       "'diffusers/<folder>' for an SD x4 diffusers folder, or "
                                       "'checkpoints/<file>' for the SD x4 single file."}),
            "impl": (list(IMPLS), {"default": _default_impl(),
                                   "tooltip": "auto: whatever the file is. gan / diffusion: insist on that kind "
                                              "(an error says so when the file is the other kind). The default "
                                              "comes from DREAMFORGE_DEFAULT_IMPL."}),
            "dtype": (["auto", *DTYPE_NAMES], {"default": "auto",
                                               "tooltip": "auto: fp16 on CUDA where the model allows (SD x4: UNet "
                                                          "fp16, VAE bf16/fp32), fp32 on the CPU."}),
        }, "optional": {
            "attention_slicing": ("BOOLEAN", {"default": False,
                                              "tooltip": "SD x4: compute attention in slices (less VRAM, slower)."}),
            "cpu_offload": ("BOOLEAN", {"default": False,
                                        "tooltip": "SD x4: keep only the network in use (text encoder, UNet, VAE) "
                                                   "on the GPU; the others wait in system RAM."}),
        }}

    def load(self, model_name, impl, dtype, attention_slicing=False, cpu_offload=False):
        handle = _load(_model_path(model_name), impl, dtype, attention_slicing, cpu_offload)
        gan = handle.upscaler.descriptor if isinstance(handle.upscaler, GANUpscaler) else None
        return (handle, gan)


class ESRGANUpscale:
    DESCRIPTION = ("Upscales with a GAN model, tiled and seam-free, to any scale (native passes, then an exact "
                   "antialiased resample). Takes our UPSCALER or ComfyUI's UPSCALE_MODEL.")
    CATEGORY = CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("image", "receipt")
    OUTPUT_TOOLTIPS = ("The upscaled image.", "JSON: what ran (model, sha256, tiles, retries, seconds).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE", {"tooltip": "The image(s) to upscale: RGB, RGBA (alpha kept) or grey; batches work."}),
            "upscale_model": ("UPSCALER,UPSCALE_MODEL", {"tooltip": "From Load Upscaler or Load Upscale Model."}),
            "scale": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 16.0, "step": 0.05,
                                "tooltip": "Output/input size ratio. 0 = the model's native scale."}),
            **_tiling_inputs(),
        }}

    def run(self, image, upscale_model, scale, tile, overlap, resample):
        handle = _as_handle(upscale_model)
        if handle.upscaler.capabilities.impl != "gan":
            raise UpscalerError("ESRGAN Upscale runs GAN models, but upscale_model is the Stable Diffusion x4 upscaler: "
                                "connect it to 'SDX4 Upscale (DreamForge)' or 'Tiled Upscale (DreamForge)' instead")
        return _run_upscale(handle, image, scale or None, tile, overlap, resample)


def _diffusion_inputs() -> dict:
    return {
        "prompt": ("STRING", {"default": DEFAULT_PROMPT, "multiline": True,
                              "tooltip": "What the image shows / should look like (SD x4 only; GANs ignore it)."}),
        "negative_prompt": ("STRING", {"default": "", "multiline": True,
                                       "tooltip": "What to steer away from, e.g. 'blurry, jpeg artifacts' (SD x4 only)."}),
        "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                         "tooltip": "Noise seed (SD x4): the same seed gives the same image on the same device."}),
        "steps": ("INT", {"default": 50, "min": 1, "max": 1000,
                          "tooltip": "DDIM denoising steps (SD x4). 20-30 is faster, 50 is the quality default."}),
        "guidance": ("FLOAT", {"default": 7.5, "min": 0.0, "max": 30.0, "step": 0.1, "round": 0.01,
                               "tooltip": "Classifier-free guidance (SD x4); 1 or less turns it off (2x faster)."}),
        "noise_level": ("INT", {"default": 20, "min": 0, "max": 350,
                                "tooltip": "Noise added to the low-res input (SD x4): higher invents more detail, "
                                           "lower stays closer to the input. ComfyUI's noise_augmentation x 350."}),
    }


def _sdx4_options(steps, guidance, noise_level, negative_prompt, tile=0, overlap=32, vae_tile=0) -> SDX4Options:
    return SDX4Options(steps=steps, guidance=guidance, noise_level=noise_level, negative_prompt=negative_prompt,
                       tile=tile, overlap=overlap, vae_tile=vae_tile)


class TiledUpscale:
    DESCRIPTION = ("Tiled upscaler over any UPSCALER with an implementation policy: auto runs a GAN around 2x and "
                   "the SD x4 model for 4x (when one is loaded); strict_scale refuses scales the model cannot reach "
                   "without resampling. Out of memory: smaller tiles, then (unless strict) GAN, then Lanczos.")
    CATEGORY = CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("image", "receipt")
    OUTPUT_TOOLTIPS = ("The upscaled image.", "JSON: what ran (impl, model, tiles, retries, fallbacks, seed).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE", {"tooltip": "The image(s) to upscale: RGB, RGBA (alpha kept) or grey; batches work."}),
            "upscaler": ("UPSCALER", {"tooltip": "From Load Upscaler: a GAN or the SD x4 upscaler."}),
            "impl": (list(IMPLS), {"default": _default_impl(),
                                   "tooltip": "auto: GAN for ~2x (x2plus when present), SD x4 for 4x when loaded. "
                                              "diffusion: the SD x4 model (scale 2 = x4 then downsample). gan: a GAN "
                                              "(from models/upscale_models when the connected one is SD x4)."}),
            "scale": ("FLOAT", {"default": 4.0, "min": 0.05, "max": 16.0, "step": 0.05,
                                "tooltip": "Output/input size ratio; exact output size round(W*s) x round(H*s)."}),
            "strict_scale": ("BOOLEAN", {"default": False,
                                         "tooltip": "Refuse scales the model cannot produce natively (no resampling), "
                                                    "and no fallback to another method on out-of-memory."}),
            **_tiling_inputs(),
        }, "optional": _diffusion_inputs()}

    @classmethod
    def VALIDATE_INPUTS(cls, impl=None, scale=None, strict_scale=None):
        # Queue-time check (ComfyUI answers /prompt with a validation error). ComfyUI skips its own
        # range and choice checks for every input named here, so they are repeated first.
        values = {"impl": impl, "scale": scale, "strict_scale": strict_scale}
        if problem := declared_input_errors(cls, values):
            return problem
        if strict_scale and impl is not None and scale is not None:
            return strict_scale_error(impl, scale) or True
        return True

    def run(self, image, upscaler, impl, scale, strict_scale, tile, overlap, resample, prompt=DEFAULT_PROMPT,
            negative_prompt="", seed=0, steps=50, guidance=7.5, noise_level=20):
        handle = _as_handle(upscaler)
        choice = choose_run(impl, scale, handle.upscaler.capabilities.impl)
        if strict_scale and (error := strict_scale_error(choice.impl, scale)):
            raise UpscalerError(error)
        chosen = handle if choice.use_loaded else _folder_gan(choice.gan_scale)
        policy = {"policy": {"impl": impl, "ran": choice.impl, "reason": choice.reason}}
        if choice.impl == "diffusion":
            # the latent is the input's size, so the user's tile and overlap are the UNet's latent tiles
            options = _sdx4_options(steps, guidance, noise_level, negative_prompt, tile=tile, overlap=overlap)
            return _run_upscale(chosen, image, scale, tile, overlap, resample, strict_scale, prompt=prompt, seed=seed,
                                extra=policy, options=options, fallbacks=not strict_scale)
        return _run_upscale(chosen, image, scale, tile, overlap, resample, strict_scale, extra=policy,
                            fallbacks=not strict_scale)


class SDX4Upscale:
    DESCRIPTION = ("Stable Diffusion x4 upscaler: prompt-guided 4x with latent-tiled denoising (one coherent image, "
                   "no seams) and a tiled 4x VAE decode that keeps one tone across tiles. Out of memory: smaller "
                   "tiles, then a GAN, then Lanczos (the receipt lists each step).")
    CATEGORY = CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("image", "receipt")
    OUTPUT_TOOLTIPS = ("The 4x image.", "JSON: model, seed, steps, tiles, retries, fallbacks, seconds.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE", {"tooltip": "The image(s) to upscale 4x (the latent is this size: 512 px -> 2048 px)."}),
            "upscaler": ("UPSCALER", {"tooltip": "The SD x4 upscaler from Load Upscaler (impl diffusion or auto)."}),
            **_diffusion_inputs(),
            "tile": ("INT", {"default": 0, "min": 0, "max": 4096, "step": 8,
                             "tooltip": "UNet tile side in input pixels (the latent is the input's size). 0 = auto: "
                                        "untiled when it fits free memory."}),
            "overlap": ("INT", {"default": 32, "min": 0, "max": 256, "step": 1,
                                "tooltip": "cos² blend between UNet tiles, in input pixels."}),
            "vae_tile": ("INT", {"default": 0, "min": 0, "max": 4096, "step": 8,
                                 "tooltip": "Decode tile side in input pixels. 0 = auto (at most 224 + padding, so the "
                                            "decoder's attention never sees a large latent at once)."}),
        }}

    def run(self, image, upscaler, prompt, negative_prompt, seed, steps, guidance, noise_level, tile, overlap, vae_tile):
        handle = _as_handle(upscaler)
        if handle.upscaler.capabilities.impl != "diffusion":
            raise UpscalerError(
                "SDX4 Upscale needs the Stable Diffusion x4 upscaler, but the connected upscaler is a GAN "
                f"({handle.upscaler.source.file}); load x4-upscaler-ema.safetensors or its diffusers folder with "
                "'Load Upscaler' (impl diffusion), or use 'ESRGAN Upscale' / 'Tiled Upscale' for GANs."
            )
        return _run_upscale(handle, image, 4, 0, 0, "lanczos", prompt=prompt, seed=seed, fallbacks=True,
                            options=_sdx4_options(steps, guidance, noise_level, negative_prompt, tile, overlap, vae_tile))


class ColorFix:
    DESCRIPTION = ("Corrects colour shift of an upscaled image against a reference (e.g. the input): wavelet keeps "
                   "the image's detail and the reference's low frequencies; adain matches mean/std per channel.")
    CATEGORY = CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The image with the reference's colours.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE", {"tooltip": "The image to correct (e.g. the upscaled output)."}),
            "reference": ("IMAGE", {"tooltip": "Colours to match; resized to the image first."}),
            "method": (list(COLOR_FIX_METHODS), {"default": "wavelet",
                                                  "tooltip": "wavelet: keep the image's detail, take the reference's "
                                                             "low frequencies (best after SR). adain: match each "
                                                             "channel's mean and std."}),
        }}

    def run(self, image, reference, method):
        return (color_fix(image, reference, method).to(mm.intermediate_device()),)


NODE_CLASS_MAPPINGS = {
    "DreamForgeLoadUpscaler": LoadUpscaler,
    "DreamForgeESRGANUpscale": ESRGANUpscale,
    "DreamForgeTiledUpscale": TiledUpscale,
    "DreamForgeSDX4Upscale": SDX4Upscale,
    "DreamForgeColorFix": ColorFix,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "DreamForgeLoadUpscaler": "Load Upscaler (DreamForge)",
    "DreamForgeESRGANUpscale": "ESRGAN Upscale (DreamForge)",
    "DreamForgeTiledUpscale": "Tiled Upscale (DreamForge)",
    "DreamForgeSDX4Upscale": "SDX4 Upscale (DreamForge)",
    "DreamForgeColorFix": "Color Fix (DreamForge)",
}


# =============================================================================================
# Chain-of-Zoom (issue 4): Step, Loop, full-image Upscale, Load Prompt Model, Prompt-from-Image.
# Backends: zoom/chain.py, zoom/full_image.py, zoom/prompts.py, zoom/vlm.py.
# =============================================================================================
import dataclasses  # noqa: E402

from ..zoom import (  # noqa: E402
    COLOR_FIX_CHOICES, DEFAULT_MAX_SIDE, DEFAULT_PROCESS_SIZE, MODES as ZOOM_MODES, ZoomSettings, derive_seed,
    make_prompt, to_pil, zoom_loop, zoom_step, zoom_upscale,
)
from ..zoom.geometry import from_pil  # noqa: E402

ZOOM_CATEGORY = "DreamForge/zoom"
PROMPT_MODEL_FOLDER = "LLM"  # ComfyUI/models/LLM: the community's folder for language / vision-language models
PREVIEW_MAX_SIDE = 512
# models/LLM is not a folder ComfyUI 0.3.75 knows: register it (extra_model_paths.yaml may add more roots).
folder_paths.add_model_folder_path(PROMPT_MODEL_FOLDER, os.path.join(folder_paths.models_dir, PROMPT_MODEL_FOLDER))


def _prompt_model_names() -> list[str]:
    """Sub-folders of models/LLM (one or two levels deep) holding a transformers config.json."""
    names = set()
    for root in folder_paths.get_folder_paths(PROMPT_MODEL_FOLDER):
        base = Path(root)
        if base.is_dir():
            for pattern in ("*/config.json", "*/*/config.json"):
                names.update(p.parent.relative_to(base).as_posix() for p in base.glob(pattern))
    return sorted(names)


def _prompt_model_path(name: str) -> Path:
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts:
        raise UpscalerError(f"model_name must be a folder inside models/{PROMPT_MODEL_FOLDER}; got {name!r}")
    for root in folder_paths.get_folder_paths(PROMPT_MODEL_FOLDER):
        path = Path(root) / relative
        if (path / "config.json").is_file():  # symlinked model folders are fine
            return path
    raise UpscalerError(
        f"prompt model {name!r} not found: put the model folder (config.json, weights, processor files) in "
        f"models/{PROMPT_MODEL_FOLDER}/ and refresh"
    )


class _PromptModelHolder(torch.nn.Module):
    """Gives ComfyUI's memory manager one module to load and offload."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model


@dataclass(frozen=True)
class PromptModelHandle:
    """What flows on a PROMPT_MODEL link: the provider plus its registration with the memory manager."""

    provider: object  # zoom.vlm.VLMPromptProvider
    patcher: comfy.model_patcher.ModelPatcher

    @property
    def name(self) -> str:
        return self.provider.name

    def describe(self, images, instruction, *, seed=None, check_interrupt=None, **generation):
        mm.load_models_gpu([self.patcher], force_full_load=True)
        return self.provider.describe(images, instruction, seed=seed, check_interrupt=check_interrupt, **generation)


def _as_prompt_model(value) -> PromptModelHandle | None:
    if value is None or isinstance(value, PromptModelHandle):
        return value
    raise UpscalerError(f"prompt_model must come from 'Load Prompt Model (DreamForge)'; got {type(value).__name__}")


def _preview(image) -> tuple:
    """The preview tuple ComfyUI 0.3.75's progress hook sends: (format, PIL image, max side)."""
    pil = image if not isinstance(image, torch.Tensor) else to_pil(image[:1])
    if max(pil.size) > 2 * PREVIEW_MAX_SIDE:
        pil = pil.copy()
        pil.thumbnail((2 * PREVIEW_MAX_SIDE, 2 * PREVIEW_MAX_SIDE))
    return ("JPEG", pil, min(PREVIEW_MAX_SIDE, max(pil.size)))  # the server's ImageOps.contain would also enlarge


def _zoom_inputs() -> dict:
    return {
        "mode": (list(ZOOM_MODES), {"default": "recursive_multiscale",
                                    "tooltip": "recursive: zoom into the previous state, prompt from the zoomed view. "
                                               "recursive_multiscale: same, prompt from the previous state + the view. "
                                               "onestep: one SR call from x0 per state. nearest/bicubic: baselines, no model."}),
        "process_size": ("INT", {"default": DEFAULT_PROCESS_SIZE, "min": 64, "max": 4096, "step": 8,
                                 "tooltip": "Side of every scale-state (the input's short side is resized to it, "
                                            "then centre-cropped). Multiple of 8."}),
        "prompt": ("STRING", {"default": "", "multiline": True,
                              "tooltip": "Your prompt. With a prompt model the prompt is '{generated}, {yours},'."}),
        "color_fix": (list(COLOR_FIX_CHOICES), {"default": "wavelet",
                                                "tooltip": "Colour fix of every state against its bicubic view "
                                                           "(the published code defaults to none)."}),
        "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                         "tooltip": "Each step derives its own seed from this (for diffusion upscalers and sampling "
                                    "prompt models)."}),
        "tile": ("INT", {"default": 0, "min": 0, "max": 8192, "step": 8,
                         "tooltip": "Tile side for the upscaler in input pixels; 0 = auto."}),
    }


def _settings(handle: UpscalerHandle | None, mode, process_size, prompt, color_fix, seed, tile, prompt_model,
              progress: bool = False) -> ZoomSettings:
    hooks = _hooks(handle)
    if not progress:
        hooks = dataclasses.replace(hooks, progress=None)  # the node reports per step instead of per tile
    return ZoomSettings(mode=mode, process_size=process_size, user_prompt=prompt, provider=_as_prompt_model(prompt_model),
                        color_fix=color_fix, seed=seed, tile=tile, device=mm.get_torch_device(), hooks=hooks)


class ChainOfZoomStep:
    DESCRIPTION = ("One Chain-of-Zoom scale-state transition: x_(n-1) -> x_n (4x deeper into the centre). Chain "
                   "Step nodes with step 1, 2, 3... to reproduce the Loop; onestep/nearest/bicubic also need x0 as origin.")
    CATEGORY = ZOOM_CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = ("IMAGE", "STRING", "STRING")
    RETURN_NAMES = ("state", "prompt", "receipt")
    OUTPUT_TOOLTIPS = ("x_n, the next scale-state.", "The prompt this step used.", "JSON receipt.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "state": ("IMAGE", {"tooltip": "The previous scale-state x_(n-1) (for step 1: any image; it is "
                                               "prepared to process_size)."}),
                "upscaler": ("UPSCALER,UPSCALE_MODEL", {"tooltip": "A 4x upscaler (SD x4 or a 4x GAN)."}),
                "step": ("INT", {"default": 1, "min": 1, "max": 8,
                                 "tooltip": "n: this node makes x_n (4**n times x0). Selects the seed, and the crop for "
                                            "onestep/nearest/bicubic."}),
                **_zoom_inputs(),
            },
            "optional": {
                "origin": ("IMAGE", {"tooltip": "x0, for onestep/nearest/bicubic (they crop x0 at every step)."}),
                "prompt_model": ("PROMPT_MODEL", {"tooltip": "Describes each view (Load Prompt Model)."}),
            },
        }

    def run(self, state, upscaler, step, mode, process_size, prompt, color_fix, seed, tile, origin=None,
            prompt_model=None):
        handle = _as_handle(upscaler)
        settings = _settings(handle, mode, process_size, prompt, color_fix, seed, tile, prompt_model)
        if origin is not None and origin.shape[0] not in (1, state.shape[0]):
            raise UpscalerError(f"origin has {origin.shape[0]} images; connect 1 or as many as state ({state.shape[0]})")
        bar = comfy.utils.ProgressBar(state.shape[0])
        states, prompts, receipts = [], [], []
        for i in range(state.shape[0]):
            x0 = None if origin is None else to_pil(origin[min(i, origin.shape[0] - 1)])
            result = zoom_step(handle.upscaler, to_pil(state[i]), step, settings, origin=x0, index=i)
            states.append(from_pil(result.state))
            prompts.append(result.prompt)
            receipts.append(result.receipt)
            bar.update_absolute(i + 1, state.shape[0], preview=_preview(result.state))
        receipt = receipts[0] if len(receipts) == 1 else {"batch": receipts}
        return (torch.cat(states).to(mm.intermediate_device()), "\n".join(prompts), json.dumps(receipt, indent=1))


class ChainOfZoomLoop:
    DESCRIPTION = ("Chain-of-Zoom extreme zoom: the image's centre enlarged 4x per step by the same 4x upscaler, a "
                   "prompt per scale-state. Returns every state (x0 = 1x, x1 = 4x, x2 = 16x...) as one batch.")
    CATEGORY = ZOOM_CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = ("IMAGE", "STRING", "STRING")
    RETURN_NAMES = ("states", "prompts", "receipt")
    OUTPUT_TOOLTIPS = ("x0..x_steps of each input image, in that order.", "One line per step.", "JSON receipt.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "The starting image(s); each is prepared to process_size (x0)."}),
                "upscaler": ("UPSCALER,UPSCALE_MODEL", {"tooltip": "A 4x upscaler (SD x4 or a 4x GAN)."}),
                "steps": ("INT", {"default": 4, "min": 1, "max": 8, "tooltip": "Scale-states after x0 (4**steps zoom)."}),
                **_zoom_inputs(),
            },
            "optional": {
                "prompt_model": ("PROMPT_MODEL", {"tooltip": "Describes each view (Load Prompt Model)."}),
            },
        }

    def run(self, image, upscaler, steps, mode, process_size, prompt, color_fix, seed, tile, prompt_model=None):
        handle = _as_handle(upscaler)
        settings = _settings(handle, mode, process_size, prompt, color_fix, seed, tile, prompt_model)
        total = image.shape[0] * steps
        bar = comfy.utils.ProgressBar(total)

        def on_state(index, n, state):
            bar.update_absolute(index * steps + n, total, preview=_preview(state))

        result = zoom_loop(handle.upscaler, image, steps, settings, on_state=on_state)
        prompts = "\n".join(p for per_image in result.prompts for p in per_image)
        return (result.tensor().to(mm.intermediate_device()), prompts, json.dumps(result.receipt, indent=1))


class ChainOfZoomUpscale:
    DESCRIPTION = ("Chain-of-Zoom for the whole image at any scale (e.g. 2.5, 16): 4x passes of the tiled upscaler "
                   "with a prompt each (per tile with a prompt model), a colour fix per pass, then an exact resize to "
                   "round(W*scale) x round(H*scale).")
    CATEGORY = ZOOM_CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("image", "receipt")
    OUTPUT_TOOLTIPS = ("round(W*scale) x round(H*scale).", "JSON: passes, prompts, seeds, timings.")

    @classmethod
    def INPUT_TYPES(cls):
        inputs = _zoom_inputs()
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "The image(s) to enlarge (RGBA keeps its alpha)."}),
                "upscaler": ("UPSCALER,UPSCALE_MODEL", {"tooltip": "A 4x upscaler (SD x4 or a 4x GAN)."}),
                "scale": ("FLOAT", {"default": 4.0, "min": 1.0, "max": 256.0, "step": 0.05,
                                    "tooltip": "Output / input size. ceil(log4 scale) 4x passes, then an exact resize."}),
                "prompt": inputs["prompt"],
                "color_fix": (inputs["color_fix"][0], {"default": "wavelet",
                                                       "tooltip": "Per pass, against that pass's input."}),
                "seed": inputs["seed"],
                **_tiling_inputs(),
                "max_side": ("INT", {"default": DEFAULT_MAX_SIDE, "min": 64, "max": 65536, "step": 64,
                                     "tooltip": "Refuse (before any work) outputs whose longer side exceeds this."}),
                "tile_prompts": ("BOOLEAN", {"default": True,
                                             "tooltip": "With a prompt model: a prompt per tile (whole image + tile, "
                                                        "multi-scale instruction); off: one prompt per pass."}),
            },
            "optional": {
                "prompt_model": ("PROMPT_MODEL", {"tooltip": "Describes the image / each tile (Load Prompt Model)."}),
            },
        }

    def run(self, image, upscaler, scale, prompt, color_fix, seed, tile, overlap, resample, max_side, tile_prompts,
            prompt_model=None):
        handle = _as_handle(upscaler)
        previews = {}

        def on_pass(p, total, current):
            bar = previews.setdefault(total, comfy.utils.ProgressBar(total))
            bar.update_absolute(p, total, preview=_preview(current))

        out, receipt = zoom_upscale(
            handle.upscaler, image, scale, user_prompt=prompt, provider=_as_prompt_model(prompt_model),
            tile_prompts=tile_prompts, color_fix=color_fix, seed=seed, tile=tile, overlap=overlap, resample=resample,
            max_side=max_side, device=mm.get_torch_device(), hooks=_hooks(handle), on_pass=on_pass,
        )
        return (out.to(mm.intermediate_device()), json.dumps(receipt, indent=1))


class LoadPromptModel:
    DESCRIPTION = (f"Loads a vision-language model (transformers image-text-to-text, e.g. Qwen2.5-VL-3B-Instruct) from "
                   f"models/{PROMPT_MODEL_FOLDER}/<folder> to describe images for Chain-of-Zoom. Nothing is downloaded.")
    CATEGORY = ZOOM_CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("PROMPT_MODEL",)
    RETURN_NAMES = ("prompt_model",)
    OUTPUT_TOOLTIPS = ("For Chain-of-Zoom nodes and Prompt from Image.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model_name": (_prompt_model_names(), {"tooltip": f"A folder in models/{PROMPT_MODEL_FOLDER} with config.json, "
                                                              "weights and processor files."}),
            "dtype": (["auto", "fp32", "fp16", "bf16"], {"default": "auto",
                                                         "tooltip": "auto: bf16 (or fp16) on CUDA, fp32 on CPU."}),
            "max_new_tokens": ("INT", {"default": 32, "min": 1, "max": 1024,
                                       "tooltip": "Longest description in tokens (published: 32)."}),
            "temperature": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 2.0, "step": 0.05,
                                      "tooltip": "0 = greedy, deterministic; above 0 samples with the step's seed."}),
        }}

    def load(self, model_name, dtype, max_new_tokens, temperature):
        from ..zoom.vlm import VLMPromptProvider, pick_dtype

        path = _prompt_model_path(model_name)
        provider = VLMPromptProvider.load(path, dtype=pick_dtype(dtype, mm.get_torch_device()),
                                          device=mm.unet_offload_device(), max_new_tokens=max_new_tokens,
                                          temperature=temperature)
        holder = _PromptModelHolder(provider.module())
        patcher = comfy.model_patcher.ModelPatcher(holder, load_device=mm.get_torch_device(),
                                                   offload_device=mm.unet_offload_device(),
                                                   size=mm.module_size(holder))
        return (PromptModelHandle(provider, patcher),)


class PromptFromImage:
    DESCRIPTION = ("Describes an image with a prompt model, as Chain-of-Zoom does: one image with 'What is in this "
                   "image? Give me a set of words.', or a context image plus its zoom-in with the two-image instruction.")
    CATEGORY = ZOOM_CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("text",)
    OUTPUT_TOOLTIPS = ("The generated description.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "prompt_model": ("PROMPT_MODEL", {"tooltip": "From Load Prompt Model."}),
                "image": ("IMAGE", {"tooltip": "The image (or, with 'zoom', the context it was zoomed from)."}),
                "max_new_tokens": ("INT", {"default": 32, "min": 1, "max": 1024,
                                           "tooltip": "Longest answer in tokens (a set of words needs ~32)."}),
                "temperature": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 2.0, "step": 0.05,
                                          "tooltip": "0 = greedy, deterministic."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                                 "tooltip": "Sampling seed (used when temperature > 0)."}),
            },
            "optional": {
                "zoom": ("IMAGE", {"tooltip": "A zoom-in of 'image': the two-image (multi-scale) instruction is used."}),
            },
        }

    def run(self, prompt_model, image, max_new_tokens, temperature, seed, zoom=None):
        handle = _as_prompt_model(prompt_model)
        if handle is None:
            raise UpscalerError("prompt_model is required: connect 'Load Prompt Model (DreamForge)'")
        if zoom is not None and zoom.shape[0] not in (1, image.shape[0]):
            raise UpscalerError(f"zoom has {zoom.shape[0]} images; connect 1 or as many as image ({image.shape[0]})")
        texts = []
        for i in range(image.shape[0]):
            images = [to_pil(image[i])]
            if zoom is not None:
                images.append(to_pil(zoom[min(i, zoom.shape[0] - 1)]))
            text, _ = make_prompt(
                _Generation(handle, max_new_tokens, temperature), images, "", seed=derive_seed(seed, i),
                check_interrupt=mm.throw_exception_if_processing_interrupted,
            )
            texts.append(text)
        return ("\n".join(texts),)


class _Generation:
    """A prompt model with this node's generation settings (the loader's stay the default elsewhere)."""

    def __init__(self, handle: PromptModelHandle, max_new_tokens: int, temperature: float):
        self.handle, self.max_new_tokens, self.temperature = handle, max_new_tokens, temperature
        self.name = handle.name

    def describe(self, images, instruction, *, seed=None, check_interrupt=None):
        return self.handle.describe(images, instruction, seed=seed, check_interrupt=check_interrupt,
                                    max_new_tokens=self.max_new_tokens, temperature=self.temperature)


_ZOOM_NODES = {
    "DreamForgeCoZStep": (ChainOfZoomStep, "Chain-of-Zoom Step (DreamForge)"),
    "DreamForgeCoZLoop": (ChainOfZoomLoop, "Chain-of-Zoom Loop (DreamForge)"),
    "DreamForgeCoZUpscale": (ChainOfZoomUpscale, "Chain-of-Zoom Upscale (DreamForge)"),
    "DreamForgeLoadPromptModel": (LoadPromptModel, "Load Prompt Model (DreamForge)"),
    "DreamForgePromptFromImage": (PromptFromImage, "Prompt from Image (DreamForge)"),
}
NODE_CLASS_MAPPINGS.update({key: cls for key, (cls, _) in _ZOOM_NODES.items()})
NODE_DISPLAY_NAME_MAPPINGS.update({key: name for key, (_, name) in _ZOOM_NODES.items()})
