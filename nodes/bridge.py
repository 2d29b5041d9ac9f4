"""The bridge to ComfyUI's runtime: the ONLY module of the pack that imports comfy.* / folder_paths /
comfy_api. The node families import from here; the backends never see ComfyUI.

It supplies: the V3 node API (`io`, `ui`, `ComfyExtension` from the pinned comfy_api.v0_0_2) plus the
few schema helpers 0.3.75 needs; `register_folders()`, every global registration in one place; the
memory manager as backend callbacks (`run_hooks`) and the handles that carry a model with its
ModelPatcher on a link; model-folder lookups; progress with previews that follow the server's
`--preview-method`; interrupts; core SaveImage's file naming and its --disable-metadata flag.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from spandrel import ImageModelDescriptor

import comfy.model_management as mm
import comfy.model_patcher
import comfy.utils
import folder_paths
from comfy.cli_args import LatentPreviewMethod, args as cli_args
from comfy_api.v0_0_2 import ComfyExtension, io, ui  # pinned: `latest` is marked unstable  # noqa: F401

from ..tiling import RunHooks, cpu_memory
from ..upscalers import GANUpscaler, Upscaler, UpscalerError, load_upscaler as load_backend
from ..upscalers import discovery
from ..upscalers.assets import BUNDLED_DIR, BUNDLED_MODEL
from ..upscalers.catalog import FOLDERS as ASSET_FOLDERS
from ..upscalers.coz_sd3 import Residency
from ..upscalers.gan import register_sd_x4_refusal
from ..upscalers.registry import default_impl, pick_gan
from ..upscalers.sdx4 import is_sdx4_path
from ..zoom.geometry import to_pil

log = logging.getLogger("dreamforge_upscale")

DIFFUSERS_PREFIX, CHECKPOINTS_PREFIX = "diffusers/", "checkpoints/"
PROMPT_MODEL_FOLDER = "LLM"  # ComfyUI/models/LLM: the community's folder for (vision-)language models
TAGGER_FOLDER = "RAM"  # ComfyUI/models/RAM: Recognize Anything + the DAPE LoRA
# ComfyUI's bundled tokenizer files (SD 1/2 CLIP vocabulary, T5), so nothing is downloaded.
CLIP_TOKENIZER_DIR = Path(comfy.utils.__file__).resolve().parent / "sd1_tokenizer"
T5_TOKENIZER_DIR = CLIP_TOKENIZER_DIR.parent / "text_encoders" / "t5_tokenizer"

UPSCALER = io.Custom("UPSCALER")
PROMPT_MODEL = io.Custom("PROMPT_MODEL")


# ------------------------------------------------------------------------------ registration
def register_folders() -> None:
    """Every global registration the pack makes, in one place; idempotent (ComfyUI's calls ignore a
    folder already listed, the refusal entry is added once). Called by the extension before its node
    list is built, since the loaders' choice lists read these folders.

    - the bundled Compact model's folder joins `upscale_models` (our loader and ComfyUI's own list it);
    - what `assets prefetch` installed outside ComfyUI joins each asset kind, after ComfyUI's folders;
    - models/LLM (prompt models) and models/RAM (tagger) become model folders ComfyUI 0.3.75 lacks;
    - spandrel learns to name the SD x4 checkpoint, so ComfyUI's 'Load Upscale Model' says what to use;
    - only if the host opted in with DREAMFORGE_CPU_MALLOC_ARENA=1, on a CPU-only server: every thread
      started after this (the prompt worker included) shares glibc's main arena, so CPU passes also reuse
      their blocks > 64 MiB. Process-wide, hence off by default: then the allocator is left as it is
      (tiling/cpu_memory.py, docs/speed.md).
    """
    folder_paths.add_model_folder_path("upscale_models", str(BUNDLED_DIR))
    for kind in ASSET_FOLDERS:
        folder_paths.add_model_folder_path(kind, str(discovery.models_root() / kind))
    for folder in (PROMPT_MODEL_FOLDER, TAGGER_FOLDER):
        folder_paths.add_model_folder_path(folder, os.path.join(folder_paths.models_dir, folder))
    register_sd_x4_refusal()
    cpu_memory.configure(mm.get_torch_device())  # opt-in (DREAMFORGE_CPU_MALLOC_ARENA=1); else a no-op


# ------------------------------------------------------------------------------ schema helpers
def schema(*, aliases: tuple[str, ...] = (), **fields) -> io.Schema:
    """io.Schema, with search aliases where this ComfyUI reads them (0.3.75's Schema has no such
    field and would refuse the keyword; newer servers list the node under each alias)."""
    if aliases and "search_aliases" in {f.name for f in dataclasses.fields(io.Schema)}:
        fields["search_aliases"] = list(aliases)
    return io.Schema(**fields)


def advanced(widget: io.Input) -> io.Input:
    """Mark an input as advanced (behind the UI's advanced toggle) the way newer servers emit it:
    "advanced": true in /object_info. 0.3.75's inputs take no such argument, so it travels in
    extra_dict, which every version copies into the input's options (newer ones let it win over their own
    `advanced` argument, with the same value); 0.3.75's frontend ignores the key."""
    widget.extra_dict = {**widget.extra_dict, "advanced": True}
    return widget


class Choice(io.Combo.Input):
    """A combo declared by its list of choices, as V1 did. ComfyUI 0.3.75 checks a queued value against
    the list only when the input's type IS the list (execution.py validate_inputs); io.Combo's "COMBO"
    type with an "options" key would be accepted unchecked there. Every frontend reads this form."""

    def get_io_type(self):
        return list(self.options)

    def as_dict(self):
        spec = super().as_dict()
        spec.pop("options", None)
        spec.pop("multiselect", None)
        return spec


def declared_input_errors(node_cls: type[io.ComfyNode], values: dict) -> dict[str, str]:
    """ComfyUI's own checks (choices, number type, min/max) on widget values, read from the node's V3
    schema: {input: problem}. A validate_inputs that names an input switches those checks off for it.
    A value of None (a linked input) is checked at run time instead."""
    inputs = {i.id: i for i in node_cls.define_schema().inputs}
    problems = {}
    for name, value in values.items():
        spec = inputs.get(name)
        if value is not None and spec is not None and (problem := _widget_error(spec, value)):
            problems[name] = f"{name}: {problem}"
    return problems


def _widget_error(spec: io.Input, value) -> str | None:
    if isinstance(spec, io.Combo.Input):
        return None if value in spec.options else f"{value!r} is not one of {', '.join(map(str, spec.options))}"
    if isinstance(spec, io.Boolean.Input):
        return None if isinstance(value, bool) else f"expected true or false, got {value!r}"
    if isinstance(spec, (io.Int.Input, io.Float.Input)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"expected a number, got {value!r}"
        if spec.min is not None and value < spec.min:
            return f"{value} is smaller than the minimum {spec.min}"
        if spec.max is not None and value > spec.max:
            return f"{value} is bigger than the maximum {spec.max}"
    return None


def default_impl_choice() -> str:
    """The default of Tiled Upscale's impl policy: DREAMFORGE_DEFAULT_IMPL, or auto with a warning when it is
    misspelt (the node list must still load). Load Upscaler's impl always defaults to auto."""
    try:
        return default_impl()
    except UpscalerError as exc:
        log.warning("DreamForge: %s; using 'auto'", exc)
        return "auto"


# ------------------------------------------------------------------------------ devices, progress
def device() -> torch.device:
    return mm.get_torch_device()


def offload_device() -> torch.device:
    return mm.unet_offload_device()


def to_output(image: torch.Tensor) -> torch.Tensor:
    """Where ComfyUI keeps IMAGE tensors between nodes."""
    return image.to(mm.intermediate_device())


check_interrupt = mm.throw_exception_if_processing_interrupted


def previews_enabled() -> bool:
    """Core sends preview frames only when the server runs with --preview-method (not 'none'); API
    clients that collect streamed images rely on that."""
    return cli_args.preview_method != LatentPreviewMethod.NoPreviews


def preview_frame(image) -> tuple:
    """The preview tuple ComfyUI 0.3.75's progress hook sends: (format, PIL image, max side)."""
    pil = to_pil(image[:1]) if isinstance(image, torch.Tensor) else image
    side = cli_args.preview_size
    if max(pil.size) > 2 * side:
        pil = pil.copy()
        pil.thumbnail((2 * side, 2 * side))
    return ("JPEG", pil, min(side, max(pil.size)))  # the server's ImageOps.contain would also enlarge


class Progress:
    """ComfyUI progress bars for one node call, one per distinct total (a run may report tiles of several
    passes); `image` becomes a preview frame only when the server's preview setting asks for previews.
    Every update is also a cancel point under the server."""

    def __init__(self):
        self._bars: dict[int, comfy.utils.ProgressBar] = {}
        self._previews = previews_enabled()

    def update(self, done: int, total: int, image=None) -> None:
        bar = self._bars.get(total) or self._bars.setdefault(total, comfy.utils.ProgressBar(total))
        preview = preview_frame(image) if image is not None and self._previews else None
        bar.update_absolute(done, total, preview=preview)


# ------------------------------------------------------------------------------ memory manager
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


def load_upscaler(path: Path, impl: str, dtype: str, attention_slicing: bool = False,
                  cpu_offload: bool = False) -> UpscalerHandle:
    """Load with the file's backend family and register the model with the memory manager."""
    upscaler = load_backend(path, impl=impl, dtype=dtype, device=device(), tokenizer_dir=CLIP_TOKENIZER_DIR,
                            attention_slicing=attention_slicing, offload=cpu_offload)
    patcher = patcher_for(upscaler.module())
    if isinstance(upscaler, GANUpscaler):
        upscaler.descriptor.patcher = patcher  # newer ComfyUI's ImageUpscaleWithModel uses it
    return UpscalerHandle(upscaler, patcher)


_GANS: dict[tuple[str, int], UpscalerHandle] = {}  # the GAN that auto/gan/fallback runs load from the folders


def folder_gan(native: int) -> UpscalerHandle:
    """A GAN from models/upscale_models for a run that needs one: x2plus for 2x (else a x4 GAN), Real-ESRGAN
    x4plus for 4x, else any file named x2/x4, else the bundled model. Loaded once per file version."""
    names = [n for n in folder_paths.get_filename_list("upscale_models")
             if not is_sdx4_path(folder_paths.get_full_path("upscale_models", n) or "")]
    name = pick_gan(names, native) or BUNDLED_MODEL
    path = Path(folder_paths.get_full_path_or_raise("upscale_models", name))
    key = (str(path), path.stat().st_mtime_ns)
    if key not in _GANS:
        _GANS.clear()
        _GANS[key] = load_upscaler(path, "gan", "auto")
    return _GANS[key]


def gan_fallback() -> Upscaler:
    """The fallback a diffusion run takes at its smallest tiles: a x4 GAN from the folders, loaded where it
    runs (loading it unloads the diffusion model when the device needs the room)."""
    gan = folder_gan(4)
    mm.load_models_gpu([gan.patcher], force_full_load=True)
    return gan.upscaler


def residency(text_patcher, main_patcher) -> Residency:
    """Both networks of the Chain-of-Zoom model through ComfyUI's manager: loading one evicts the other
    when the device is short of room."""
    return Residency(
        text=lambda _bytes: mm.load_models_gpu([text_patcher], force_full_load=True),
        main=lambda activation: mm.load_models_gpu([main_patcher], memory_required=activation, force_full_load=True),
        release_text=lambda: None,  # left loaded: the manager unloads it when the transformer needs the room
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


# ------------------------------------------------------------------------------ model folders
def asset_locations(strict: bool = True) -> discovery.Locations:
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


def upscale_model_names() -> list[str]:
    """GAN files: models/upscale_models, the local mirror and the runtime cache."""
    return discovery.model_names("upscale_models", asset_locations(strict=False),
                                 folder_paths.get_filename_list("upscale_models"))


def prefixed_model_names(is_folder: Callable[[Path], bool], is_checkpoint: Callable[[str], bool]) -> list[str]:
    """'diffusers/<folder>' for model folders in models/diffusers and 'checkpoints/<file>' for single files
    in models/checkpoints that the predicates accept (they read headers only)."""
    names = []
    if "diffusers" in folder_paths.folder_names_and_paths:
        for root in folder_paths.get_folder_paths("diffusers"):
            if os.path.isdir(root):
                names += [DIFFUSERS_PREFIX + d.name for d in sorted(Path(root).iterdir()) if d.is_dir() and is_folder(d)]
    for name in folder_paths.get_filename_list("checkpoints"):
        full = folder_paths.get_full_path("checkpoints", name)
        if full and is_checkpoint(full):
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


def upscaler_path(model_name: str) -> Path:
    return (prefixed_model_path(model_name, "model_name")
            or discovery.locate(model_name, "upscale_models", asset_locations()).path)  # mirror > folders > cache


def filenames(folder: str) -> list[str]:
    return folder_paths.get_filename_list(folder)


def full_path(folder: str, name: str) -> Path:
    """A file of a ComfyUI model folder; ComfyUI's own error names the folder when it is missing."""
    return Path(folder_paths.get_full_path_or_raise(folder, name))


def find_file(folder: str, name: str) -> Path | None:
    found = folder_paths.get_full_path(folder, name)
    return Path(found) if found else None


def prompt_model_names() -> list[str]:
    """Sub-folders of models/LLM (one or two levels deep) holding a transformers config.json."""
    names = set()
    for root in folder_paths.get_folder_paths(PROMPT_MODEL_FOLDER):
        base = Path(root)
        if base.is_dir():
            for pattern in ("*/config.json", "*/*/config.json"):
                names.update(p.parent.relative_to(base).as_posix() for p in base.glob(pattern))
    return sorted(names)


def prompt_model_path(name: str) -> Path:
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


# ------------------------------------------------------------------------------ saving images
def save_image_path(filename_prefix: str, width: int, height: int) -> tuple[str, str, int, str]:
    """Core SaveImage's naming in output/: (folder, file stem, next counter, subfolder). ComfyUI's helper
    expands %width%/%date%-style variables, makes subfolders and refuses a prefix outside output/."""
    folder, stem, counter, subfolder, _ = folder_paths.get_save_image_path(
        filename_prefix, folder_paths.get_output_directory(), width, height)
    return folder, stem, counter, subfolder


def metadata_disabled() -> bool:
    """The server runs with --disable-metadata: core writes no prompt/workflow into saved files."""
    return bool(cli_args.disable_metadata)
