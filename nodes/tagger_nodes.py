"""Load Tagger (DreamForge): RAM / DAPE tag prompts (Chain-of-Zoom's default `dape`) as a PROMPT_MODEL.

Prompt from Image and every Chain-of-Zoom node take it like the vision-language prompt model. Files, in
ComfyUI/models/RAM/ (registered below; extra_model_paths.yaml may add more roots):
  ram_swin_large_14m.pth  (Recognize Anything, xinyu1205/recognize_anything_model)
  DAPE.pth                (Chain-of-Zoom's ckpt/DAPE; optional: 'none' = plain RAM)
"""
from __future__ import annotations

import os
from pathlib import Path

from ..upscalers import UpscalerError
from ..zoom.tagger import TaggerProvider, tagger_dtype
from .comfy_nodes import ZOOM_CATEGORY, PromptModelHandle, _PromptModelHolder, _patcher_for, folder_paths, mm

TAGGER_FOLDER = "RAM"
RAM_FILE, DAPE_FILE = "ram_swin_large_14m.pth", "DAPE.pth"
NO_DAPE = "none"
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")

# models/RAM is not a folder ComfyUI knows: register it like models/LLM.
folder_paths.add_model_folder_path(TAGGER_FOLDER, os.path.join(folder_paths.models_dir, TAGGER_FOLDER))


def _weight_files() -> list[str]:
    return [n for n in folder_paths.get_filename_list(TAGGER_FOLDER) if n.lower().endswith(WEIGHT_SUFFIXES)]


def _preferred(names: list[str], wanted: str) -> list[str]:
    """The published file name first, so a fresh node picks it."""
    return sorted(names, key=lambda n: (Path(n).name != wanted, n))


def _path(name: str, what: str) -> Path:
    full = folder_paths.get_full_path(TAGGER_FOLDER, name)
    if not full:
        raise UpscalerError(f"{what}: {name!r} not found in models/{TAGGER_FOLDER}; put {RAM_FILE} (and {DAPE_FILE}) "
                            "there and refresh")
    return Path(full)


class LoadTagger:
    DESCRIPTION = (f"Loads Recognize Anything (RAM Swin-L, {RAM_FILE}) from models/{TAGGER_FOLDER}, with Chain-of-Zoom's "
                   f"DAPE LoRA ({DAPE_FILE}) merged in, as a prompt model: each view's tags become its prompt "
                   "('tag, tag, ..., your prompt,'), the reference code's default. Weights-only loading, nothing downloaded.")
    CATEGORY = ZOOM_CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("PROMPT_MODEL",)
    RETURN_NAMES = ("prompt_model",)
    OUTPUT_TOOLTIPS = ("For Chain-of-Zoom nodes and Prompt from Image.",)

    @classmethod
    def INPUT_TYPES(cls):
        files = _weight_files()
        return {
            "required": {
                "ram_model": (_preferred(files, RAM_FILE), {"tooltip": f"RAM checkpoint in models/{TAGGER_FOLDER} "
                                                                      f"({RAM_FILE}, 5.6 GB; only the ~0.8 GB it needs is read)."}),
                "dape": ([NO_DAPE] + _preferred(files, DAPE_FILE), {
                    "default": DAPE_FILE if any(Path(f).name == DAPE_FILE for f in files) else NO_DAPE,
                    "tooltip": f"DAPE LoRA ({DAPE_FILE}, tuned for degraded images), merged at load; "
                               "'none' = plain RAM."}),
                "max_tags": ("INT", {"default": 0, "min": 0, "max": 256,
                                     "tooltip": "0 = every tag that fires; else the most probable ones "
                                                "(still listed in tag-list order)."}),
                "drop_tags": ("STRING", {"default": "", "multiline": False,
                                         "tooltip": "Tags never to use, comma-separated (names from RAM's tag list)."}),
                "keep_tags": ("STRING", {"default": "", "multiline": False,
                                         "tooltip": "Tags always to use, comma-separated (names from RAM's tag list)."}),
                "threshold_offset": ("FLOAT", {"default": 0.0, "min": -0.5, "max": 0.5, "step": 0.01,
                                               "tooltip": "Added to every tag's own threshold: negative = more tags. "
                                                          "Tags RAM switches off stay off."}),
                "dtype": (["auto", "fp32", "fp16", "bf16"], {"default": "auto",
                                                             "tooltip": "auto: fp16 on CUDA (as the reference), "
                                                                        "fp32 on the CPU."}),
            },
        }

    def load(self, ram_model, dape, max_tags, drop_tags, keep_tags, threshold_offset, dtype):
        ram_path = _path(ram_model, "ram_model")
        dape_path = None if dape == NO_DAPE else _path(dape, "dape")
        if dape_path is not None and dape_path.resolve() == ram_path.resolve():
            raise UpscalerError(f"dape: {dape} is the RAM checkpoint itself; choose {DAPE_FILE} or 'none'")
        provider = TaggerProvider.load(ram_path, dape_path, dtype=tagger_dtype(dtype, mm.get_torch_device()),
                                       max_tags=max_tags, drop_tags=drop_tags, keep_tags=keep_tags,
                                       threshold_offset=threshold_offset)
        return (PromptModelHandle(provider, _patcher_for(_PromptModelHolder(provider.module()))),)


NODE_CLASS_MAPPINGS = {"DreamForgeLoadTagger": LoadTagger}
NODE_DISPLAY_NAME_MAPPINGS = {"DreamForgeLoadTagger": "Load Tagger (DreamForge)"}
