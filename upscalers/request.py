"""One upscale request: everything a caller asks of a run, built once by a node, the library or the command line
and handed to the driver (upscalers/upscale.py) whole."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Union

from ..runtime.errors import UpscalerError
from .receipts import Policy

DEFAULT_OVERLAP = 16  # input px of feathered overlap; the model's context comes on top of it
# A prompt for the upscaler: one text for the whole image, or a function of a tile's window box
# (left, top, right, bottom in input pixels of the pass) giving that tile's text.
Prompt = Union[str, Callable[[tuple[int, int, int, int]], str], None]
FALLBACKS = ("gan", "resize")  # what a caller may allow after out of memory at the smallest tiles


@dataclass(frozen=True)
class UpscaleRequest:
    scale: float | None = None  # None / 0: the model's native scale
    tile: int = 0  # input px; 0 = auto (the fastest exact plan that fits)
    overlap: int = DEFAULT_OVERLAP  # input px of feathered overlap
    strict_scale: bool = False  # exactly the model's native scale; forbids every fallback
    resample: str = "lanczos"  # the filter for scales other than the native one
    prompt: Prompt = None  # prompted backends only (recorded either way)
    seed: int | None = None
    options: Any = None  # the backend's own per-call options (SDX4Options, CoZOptions)
    policy: Policy | None = None  # which implementation the caller chose, and why (`ran` is filled by the driver)
    # What the caller allows after out of memory at the smallest tiles, in order; the driver decides what
    # applies: "gan" only after a diffusion model (and only with a GAN to run), nothing under strict_scale.
    fallbacks: tuple[str, ...] = ()
    max_side: int | None = None  # default: DREAMFORGE_MAX_SIDE
    notes: tuple[str, ...] = ()  # the caller's notes for the receipt

    def __post_init__(self):
        unknown = [f for f in self.fallbacks if f not in FALLBACKS]
        if unknown:
            raise UpscalerError(f"fallbacks: {unknown[0]!r} is not one of {', '.join(FALLBACKS)}")
