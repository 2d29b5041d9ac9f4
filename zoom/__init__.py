"""Chain-of-Zoom: the scale-state loop and its modes, full-image arbitrary-scale zoom, prompt providers.
Runs without ComfyUI (the nodes live in nodes/zoom_nodes.py and nodes/prompt_nodes.py)."""
from ..imaging.image_io import from_pil, to_pil
from .chain import LoopResult, StepResult, zoom_loop, zoom_step
from .full_image import DEFAULT_MAX_SIDE, passes_for, zoom_upscale
from .geometry import DEFAULT_PROCESS_SIZE, MODES, SR_MODES, prepare
from .prompts import (
    NULL_PROVIDER, SINGLE_IMAGE_INSTRUCTION, TWO_IMAGE_INSTRUCTION, NullProvider, PromptProvider, compose_prompt,
    make_prompt,
)
from .settings import COLOR_FIX_CHOICES, SAMPLING_CHOICES, ZoomSettings, derive_seed

__all__ = [
    "COLOR_FIX_CHOICES", "SAMPLING_CHOICES", "LoopResult", "StepResult", "ZoomSettings",
    "derive_seed", "zoom_loop", "zoom_step", "DEFAULT_MAX_SIDE", "passes_for", "zoom_upscale",
    "DEFAULT_PROCESS_SIZE", "MODES", "SR_MODES", "from_pil", "prepare", "to_pil", "NULL_PROVIDER",
    "SINGLE_IMAGE_INSTRUCTION", "TWO_IMAGE_INSTRUCTION", "NullProvider", "PromptProvider", "compose_prompt",
    "make_prompt",
]
