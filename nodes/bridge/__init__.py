"""The bridge to ComfyUI's runtime: the ONLY package of the pack that imports comfy.* / folder_paths /
comfy_api. The node families import from here; the backends never see ComfyUI. One module per job:

  schema.py     the V3 node API (`io`, `ui`, `ComfyExtension`, pinned comfy_api.v0_0_2), our socket types and
                the few schema helpers 0.3.75 needs
  folders.py    `register_folders()` (every global registration), model-folder names and files, SaveImage naming
  execution.py  devices, interrupts, progress bars with previews that follow `--preview-method`
  models.py     the memory manager: handles (a model with its ModelPatcher), `run_hooks`, the folder GAN, prompt
                models
"""
from .execution import Progress, check_interrupt, device, offload_device, preview_frame, previews_enabled, to_output
from .folders import (
    CLIP_TOKENIZER_DIR, PROMPT_MODEL_FOLDER, T5_TOKENIZER_DIR, TAGGER_FOLDER, asset_locations, filenames, find_file,
    full_path, metadata_disabled, prefixed_model_names, prefixed_model_path, prompt_model_names, prompt_model_path,
    register_folders, save_image_path, upscale_model_names, upscaler_path,
)
from .models import (
    PromptModelHandle, UpscalerHandle, as_handle, as_prompt_model, folder_gan, gan_fallback, load_handle,
    patcher_for, residency, run_hooks,
)
from .schema import (
    PROMPT_MODEL, UPSCALER, Choice, ComfyExtension, advanced, declared_input_errors, default_impl_choice, io, schema,
    ui,
)

__all__ = [
    "Progress", "check_interrupt", "device", "offload_device", "preview_frame", "previews_enabled", "to_output",
    "CLIP_TOKENIZER_DIR", "PROMPT_MODEL_FOLDER", "T5_TOKENIZER_DIR", "TAGGER_FOLDER", "asset_locations", "filenames",
    "find_file", "full_path", "metadata_disabled", "prefixed_model_names", "prefixed_model_path", "prompt_model_names",
    "prompt_model_path", "register_folders", "save_image_path", "upscale_model_names", "upscaler_path",
    "PromptModelHandle", "UpscalerHandle", "as_handle", "as_prompt_model", "folder_gan", "gan_fallback",
    "load_handle", "patcher_for", "residency", "run_hooks", "PROMPT_MODEL", "UPSCALER", "Choice", "ComfyExtension",
    "advanced", "declared_input_errors", "default_impl_choice", "io", "schema", "ui",
]
