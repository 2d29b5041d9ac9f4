"""Chain-of-Zoom geometry exactly as published: preparation, centre-crop boxes, resampling, modes (their checks
are in settings.py).

Scale-states are 8-bit RGB images, as in the reference code (it writes every state to a PNG and
reads it back): the crops and resizes below run on uint8 PIL images with PIL's own filters, so a
state equals what the published script produces for the same SR output. Conversions to ComfyUI
IMAGE tensors (float 0..1) are exact both ways for 8-bit data.
"""
from __future__ import annotations

from PIL import Image

MODES = ("recursive", "recursive_multiscale", "onestep", "nearest", "bicubic")
SR_MODES = ("recursive", "recursive_multiscale", "onestep")  # the others are interpolation baselines
RECURSIVE_MODES = ("recursive", "recursive_multiscale")  # crop the previous state; others crop x0
ZOOM = 4  # magnification per step (the published `upscale`)
DEFAULT_PROCESS_SIZE = 512
PROCESS_SIZE_MULTIPLE = 8  # so the centre crop is exactly process_size / 4 and a 4x model lands on it


# ------------------------------------------------------------------------------ published steps
def prepare(image: Image.Image, size: int) -> Image.Image:
    """x0: short side to `size` with LANCZOS (sizes truncated with int()), then a centre crop size x size.

    One deliberate difference from the reference: the short side is set to exactly `size`. The
    reference computes it as int(short * (size / short)), which for many sizes (e.g. 49, 98, 750 px)
    is size - 1 in floating point, and its crop then pads a black row or column.
    """
    w, h = image.size
    scale = size / min(w, h)
    new_w, new_h = int(w * scale), int(h * scale)
    if w <= h:
        new_w = size
    if h <= w:
        new_h = size
    image = image.resize((new_w, new_h), Image.Resampling.LANCZOS)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


def centre_box(w: int, h: int, factor: int) -> tuple[int, int, int, int]:
    """The published centre crop for a zoom of `factor`: ((w - w//f)//2, (h - h//f)//2, (w + w//f)//2, (h + h//f)//2)."""
    new_w, new_h = w // factor, h // factor
    return ((w - new_w) // 2, (h - new_h) // 2, (w + new_w) // 2, (h + new_h) // 2)


def step_factor(mode: str, step: int) -> int:
    """Zoom of the crop taken at step `step` (1-based: the step that makes x_step): 4 for the recursive
    modes (from the previous state), 4**step for onestep/nearest/bicubic (from x0)."""
    return ZOOM if mode in RECURSIVE_MODES else ZOOM**step


def zoom_crop(source: Image.Image, factor: int) -> tuple[Image.Image, tuple[int, int, int, int]]:
    box = centre_box(*source.size, factor)
    return source.crop(box), box
