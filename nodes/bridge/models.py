"""Models under ComfyUI's memory manager: the handles that carry a model with its ModelPatcher on a link, the
backend callbacks (`run_hooks`) that load it and make room, the folder GAN the policy and the fallback run,
and the prompt models."""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from spandrel import ImageModelDescriptor

import comfy.model_management as mm
import comfy.model_patcher
import folder_paths

from ...tiling import RunHooks
from ...upscalers import GANUpscaler, Upscaler, UpscalerError, load_model_path
from ...upscalers import model_files
from ...upscalers.coz_sd3 import Residency
from .execution import Progress, check_interrupt, device, offload_device
from .folders import CLIP_TOKENIZER_DIR, asset_locations


def patcher_for(module: torch.nn.Module) -> comfy.model_patcher.ModelPatcher:
    """Registers a module with ComfyUI's memory manager (which keeps only a weak reference)."""
    return comfy.model_patcher.ModelPatcher(
        module, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device(),
        size=mm.module_size(module),
    )


@dataclass(frozen=True)
class UpscalerHandle:
    """What flows on an UPSCALER link: the backend plus its registration with the memory manager."""

    upscaler: Upscaler
    patcher: comfy.model_patcher.ModelPatcher


class _Prepare:
    """RunHooks.prepare for one handle: make room for the activations and load the model."""

    def __init__(self, handle: UpscalerHandle):
        self.handle = handle

    def __call__(self, activation_bytes: int) -> None:
        patcher = self.handle.patcher
        if self.handle.upscaler.offload:  # the backend moves one network at a time: room for the largest
            largest = max(mm.module_size(m) for m in patcher.model.children())
            mm.free_memory(activation_bytes + largest, mm.get_torch_device())
            return
        # force_full_load: plain torch layers that do not fit would otherwise stay on the offload device
        mm.load_models_gpu([patcher], memory_required=activation_bytes, force_full_load=True)


def run_hooks(handle: UpscalerHandle | None = None, *, progress: bool = True) -> RunHooks:
    """ComfyUI's progress bar, interrupt, memory manager and offload device as backend callbacks.
    progress=False when the node reports progress itself (per zoom step instead of per tile)."""
    oom = mm.OOM_EXCEPTION if mm.OOM_EXCEPTION is not Exception else ()  # CPU builds alias it to Exception
    return RunHooks(
        progress=Progress().update if progress else None,
        check_interrupt=check_interrupt,
        oom_errors=(oom,) if oom else (),
        free_bytes=lambda dev: int(mm.get_free_memory(dev)),
        prepare=_Prepare(handle) if handle is not None else None,
        offload_device=offload_device(),
    )


# ComfyUI 0.3.x's own loader attaches no patcher to its UPSCALE_MODEL: one per model, kept beside it
# (never written onto the user's object), so the memory manager sees the same model every run.
_CORE_PATCHERS: "weakref.WeakKeyDictionary[torch.nn.Module, comfy.model_patcher.ModelPatcher]" = weakref.WeakKeyDictionary()


def as_handle(model) -> UpscalerHandle:
    """Accept our UPSCALER or ComfyUI's UPSCALE_MODEL (a spandrel descriptor, used as it is: not copied,
    not changed)."""
    if isinstance(model, UpscalerHandle):
        return model
    if isinstance(model, ImageModelDescriptor):
        patcher = getattr(model, "patcher", None)  # newer ComfyUI loaders attach one
        if patcher is None:
            patcher = _CORE_PATCHERS.get(model.model)
            if patcher is None:
                patcher = _CORE_PATCHERS[model.model] = patcher_for(model.model)
        return UpscalerHandle(GANUpscaler.from_descriptor(model), patcher)
    raise UpscalerError(
        f"upscale_model must come from 'Load Upscaler (DreamForge)' or ComfyUI's 'Load Upscale Model'; got {type(model).__name__}"
    )


def load_handle(path: Path, impl: str, dtype: str, attention_slicing: bool = False,
                  cpu_offload: bool = False) -> UpscalerHandle:
    """Load with the file's backend family and register the model with the memory manager."""
    upscaler = load_model_path(path, impl=impl, dtype=dtype, device=device(), tokenizer_dir=CLIP_TOKENIZER_DIR,
                            attention_slicing=attention_slicing, offload=cpu_offload)
    patcher = patcher_for(upscaler.module())
    if isinstance(upscaler, GANUpscaler):
        upscaler.descriptor.patcher = patcher  # newer ComfyUI's ImageUpscaleWithModel uses it
    return UpscalerHandle(upscaler, patcher)


_GANS: dict[tuple[str, int], UpscalerHandle] = {}  # the GAN that auto/gan/fallback runs load from the folders


def folder_gan(native: int) -> UpscalerHandle:
    """A GAN from models/upscale_models for a run that needs one: x2plus for 2x (else a x4 GAN), Real-ESRGAN
    x4plus for 4x, else any file named x2/x4, else the bundled model. Loaded once per file version."""
    path = model_files.folder_gan_path(native, asset_locations(strict=False),
                                       listed=folder_paths.get_filename_list("upscale_models"))
    key = (str(path), path.stat().st_mtime_ns)
    if key not in _GANS:
        _GANS.clear()
        _GANS[key] = load_handle(path, "gan", "auto")
    return _GANS[key]


def gan_fallback() -> Upscaler:
    """The fallback a diffusion run takes at its smallest tiles: a x4 GAN from the folders, loaded where it
    runs (loading it unloads the diffusion model when the device needs the room)."""
    gan = folder_gan(4)
    mm.load_models_gpu([gan.patcher], force_full_load=True)
    return gan.upscaler


def residency(main_module: torch.nn.Module, text_module: torch.nn.Module) -> Residency:
    """Both networks of the Chain-of-Zoom model through ComfyUI's manager: loading one evicts the other
    when the device is short of room. The manager keeps weak references: the Residency holds both patchers."""
    main_patcher, text_patcher = patcher_for(main_module), patcher_for(text_module)
    return Residency(
        text=lambda _bytes: mm.load_models_gpu([text_patcher], force_full_load=True),
        main=lambda activation: mm.load_models_gpu([main_patcher], memory_required=activation, force_full_load=True),
        release_text=lambda: None,  # left loaded: the manager unloads it when the transformer needs the room
        held=(main_patcher, text_patcher),
    )


class _PromptModelHolder(torch.nn.Module):
    """Gives ComfyUI's memory manager one module to load and offload."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model


@dataclass(frozen=True)
class PromptModelHandle:
    """What flows on a PROMPT_MODEL link: the provider plus its registration with the memory manager."""

    provider: object  # zoom.vlm.VLMPromptProvider or zoom.tagger.TaggerProvider
    patcher: comfy.model_patcher.ModelPatcher

    @classmethod
    def of(cls, provider) -> "PromptModelHandle":
        return cls(provider, patcher_for(_PromptModelHolder(provider.module())))

    @property
    def name(self) -> str:
        return self.provider.name

    def describe(self, images, instruction, *, seed=None, check_interrupt=None, **generation):
        mm.load_models_gpu([self.patcher], force_full_load=True)
        return self.provider.describe(images, instruction, seed=seed, check_interrupt=check_interrupt, **generation)


def as_prompt_model(value) -> PromptModelHandle | None:
    if value is None or isinstance(value, PromptModelHandle):
        return value
    raise UpscalerError(f"prompt_model must come from 'Load Prompt Model (DreamForge)'; got {type(value).__name__}")
