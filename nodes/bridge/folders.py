"""ComfyUI's folders: every global registration in one place (`register_folders`), the model folders'
names and files, and core SaveImage's file naming and --disable-metadata flag."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable

import comfy.model_management as mm
import comfy.utils
import folder_paths
from comfy.cli_args import args as cli_args

from ...assets import discovery
from ...assets.bundled_model import BUNDLED_DIR
from ...assets.catalog import FOLDERS as ASSET_FOLDERS
from ...runtime import cpu_allocator
from ...runtime.errors import UpscalerError
from ...upscalers import model_files
from ...upscalers.model_files import CHECKPOINTS_PREFIX, DIFFUSERS_PREFIX
from ...upscalers.gan import register_sd_x4_refusal

log = logging.getLogger("dreamforge_upscale")

PROMPT_MODEL_FOLDER = "LLM"  # ComfyUI/models/LLM: the community's folder for (vision-)language models
TAGGER_FOLDER = "RAM"  # ComfyUI/models/RAM: Recognize Anything + the DAPE LoRA
# ComfyUI's bundled tokenizer files (SD 1/2 CLIP vocabulary, T5), so nothing is downloaded.
CLIP_TOKENIZER_DIR = Path(comfy.utils.__file__).resolve().parent / "sd1_tokenizer"
T5_TOKENIZER_DIR = CLIP_TOKENIZER_DIR.parent / "text_encoders" / "t5_tokenizer"


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
      (runtime/cpu_allocator.py, docs/speed.md).
    """
    folder_paths.add_model_folder_path("upscale_models", str(BUNDLED_DIR))
    for kind in ASSET_FOLDERS:
        folder_paths.add_model_folder_path(kind, str(discovery.models_root() / kind))
    for folder in (PROMPT_MODEL_FOLDER, TAGGER_FOLDER):
        folder_paths.add_model_folder_path(folder, os.path.join(folder_paths.models_dir, folder))
    register_sd_x4_refusal()
    cpu_allocator.configure(mm.get_torch_device())  # opt-in (DREAMFORGE_CPU_MALLOC_ARENA=1); else a no-op


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
    return model_files.prefixed_path(model_name, asset_locations(), what)


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


def save_image_path(filename_prefix: str, width: int, height: int) -> tuple[str, str, int, str]:
    """Core SaveImage's naming in output/: (folder, file stem, next counter, subfolder). ComfyUI's helper
    expands %width%/%date%-style variables, makes subfolders and refuses a prefix outside output/."""
    folder, stem, counter, subfolder, _ = folder_paths.get_save_image_path(
        filename_prefix, folder_paths.get_output_directory(), width, height)
    return folder, stem, counter, subfolder


def metadata_disabled() -> bool:
    """The server runs with --disable-metadata: core writes no prompt/workflow into saved files."""
    return bool(cli_args.disable_metadata)
