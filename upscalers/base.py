"""The Upscaler protocol every backend implements, and the descriptor callers ask instead of guessing."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Protocol, runtime_checkable

import torch


class UpscalerError(ValueError):
    """A problem the user can fix; the message names the input and what was expected."""


def error_text(exc: BaseException, limit: int = 200) -> str:
    """'Type: first line of the message' for an error message of our own; safe for empty messages."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0][:limit]}" if lines else type(exc).__name__


class AssetError(UpscalerError):
    """A model asset problem (missing, unreachable, corrupted, bad manifest); the message names the fix."""


@dataclass(frozen=True)
class Capabilities:
    impl: str  # "gan" | "diffusion"
    native_scales: tuple[int, ...]
    dtypes: tuple[str, ...]  # of "fp32", "fp16", "bf16"
    size_multiple: int  # window sides must be a multiple of this
    min_size: int  # smallest window side the model accepts
    square: bool  # windows must be square
    context: int  # input pixels of real context a tile needs for its core to match an untiled pass
    tiling: str  # "supported" | "discouraged" | "internal" (spandrel's hint)
    bytes_per_pixel: float  # working memory (activations) per input pixel of one image, in fp32
    in_channels: int
    out_channels: int
    takes_prompt: bool = False  # upscale_window accepts prompt= (text) and seed= keywords (diffusion backends)


@dataclass(frozen=True)
class ModelSource:
    """Where a model came from: what a receipt quotes."""

    file: str  # file name (or a label when there is no file)
    sha256: str | None  # full hex digest, None when unknown
    architecture: str
    provenance: dict | None = None  # from the file's .dreamforge.json sidecar (upscalers/provenance.py)

    def describe(self) -> dict:
        d = asdict(self)
        d["sha256"] = self.sha256[:12] if self.sha256 else None
        if self.provenance is None:
            del d["provenance"]
        return d


@runtime_checkable
class Upscaler(Protocol):
    """A loaded model that enlarges B,C,H,W windows by a native integer scale.

    Load-time choices (weights, dtype) live on the object; everything about one call (device, tiles,
    progress) is passed in, so one Upscaler can serve concurrent graphs.
    """

    capabilities: Capabilities
    source: ModelSource
    dtype: torch.dtype  # compute dtype
    offload: bool  # the backend moves its networks to the device one at a time (the caller must not move all)

    @property
    def scale(self) -> int: ...

    def module(self) -> torch.nn.Module:
        """The torch module holding the weights (what a memory manager loads and offloads)."""

    def upscale_window(self, x: torch.Tensor) -> torch.Tensor:
        """x: B,C,h,w in 0..1 on the weights' device (any float dtype) -> B,C,h*s,w*s in 0..1.

        When `capabilities.takes_prompt` is true it is called as upscale_window(x, prompt=str, seed=int|None)
        (the text that conditions this window and the call's seed); other upscalers are called with x only.
        When it also has `capabilities.tiling == "internal"` (generative backends: SD x4) it gets the whole
        image and plans its own tiles, and is called with options= (its per-call settings), hooks=
        (progress, interrupt, memory) and report= (a dict it fills with tiles, retries and the seed used).
        """
