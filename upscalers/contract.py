"""The one contract every upscaler backend implements, and the descriptor callers ask instead of guessing.

A backend is a loaded model that turns a B,C,h,w window into a B,C,h*s,w*s window:

    result = upscaler.upscale_window(x, cond, hooks)   # -> WindowResult(image, report)

The same call for every backend. `cond` (Conditioning) carries everything about this call that is not
pixels: the text prompt and the seed (prompted backends use them, the others ignore them), the backend's
own per-call options, and a memo that lives exactly as long as one run. `hooks` is the host's environment
(progress, interrupt, memory). `report` is what the backend did (seed drawn, its own tiles, retries,
notes) for the receipt. Load-time choices (weights, dtype, offload) live on the object; nothing about a
call is stored there, so one upscaler serves concurrent graphs.

Two descriptor fields tell the driver (upscalers/upscale.py) how to call it:
  prompted     it is conditioned on text and a seed (SD x4, the Chain-of-Zoom SD3 model)
  whole_image  it plans its own tiles (latent tiles, tiled VAE): it gets a whole pass input per call;
               otherwise the driver tiles the image (tiling/runner.py) and calls it per window.
A new backend is one folder under upscalers/ exposing a `BACKEND` (upscalers/backends.py) and this
contract.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

import torch

from ..tiling import RunHooks


class Impl(str, Enum):
    """The two kinds of upscaler the impl policy chooses between (a str: receipts and JSON carry "gan" / "diffusion")."""

    GAN = "gan"
    DIFFUSION = "diffusion"

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


@dataclass(frozen=True)
class Capabilities:
    impl: Impl
    native_scales: tuple[int, ...]
    dtypes: tuple[str, ...]  # of "fp32", "fp16", "bf16"
    size_multiple: int  # window sides must be a multiple of this
    min_size: int  # smallest window side the model accepts
    square: bool  # windows must be square
    context: int  # input pixels of real context a tile needs for its core to match an untiled pass
    bytes_per_pixel: float  # working memory (activations) per input pixel of one image, in fp32
    in_channels: int
    out_channels: int
    prompted: bool = False  # conditioned on Conditioning.prompt and .seed
    whole_image: bool = False  # plans its own tiles: one call per pass with the whole image
    tiling_hint: str = "supported"  # spandrel's hint for window-tiled models: "supported" | "discouraged"

    def __post_init__(self):
        object.__setattr__(self, "impl", Impl(self.impl))  # "gan" / "diffusion" from a third-party backend too


@dataclass(frozen=True)
class ModelSource:
    """Where a model came from: what a receipt quotes."""

    file: str  # file name (or a label when there is no file)
    sha256: str | None  # full hex digest, None when unknown
    architecture: str
    provenance: dict | None = None  # from the file's .dreamforge.json sidecar (assets/provenance.py)

    def describe(self) -> dict:
        d = asdict(self)
        d["sha256"] = self.sha256[:12] if self.sha256 else None
        return d


class RunMemo:
    """Values a backend may reuse within one run (e.g. a prompt's text embedding across the tiles, passes
    and zoom steps of one node execution). Created by whoever starts the run and dropped with it."""

    def __init__(self) -> None:
        self._values: dict[Any, Any] = {}

    def get_or_make(self, key, make: Callable[[], Any]) -> tuple[Any, bool]:
        """(value, reused): `make()` runs only for a key not seen in this run."""
        if key in self._values:
            return self._values[key], True
        value = self._values[key] = make()
        return value, False


@dataclass(frozen=True)
class Conditioning:
    """Everything about one call that is not pixels."""

    prompt: str | None = None  # the text for this window (None: the backend's default)
    seed: int | None = None  # None: the backend draws one and reports it
    options: Any = None  # the backend's own per-call options (SDX4Options, CoZOptions), None = defaults
    memo: RunMemo = field(default_factory=RunMemo, compare=False)


@dataclass
class WindowResult:
    image: torch.Tensor  # B,C,h*s,w*s in 0..1 (float)
    report: dict = field(default_factory=dict)  # JSON-able: what the backend did (seed, its tiles, notes)


@runtime_checkable
class Upscaler(Protocol):
    """A loaded model that enlarges B,C,H,W windows by a native integer scale."""

    capabilities: Capabilities
    source: ModelSource
    dtype: torch.dtype  # compute dtype
    offload: bool  # the backend moves its networks to the device one at a time (the caller must not move all)

    @property
    def scale(self) -> int: ...

    def module(self) -> torch.nn.Module:
        """The torch module holding the weights (what a memory manager loads and offloads)."""

    def upscale_window(self, x: torch.Tensor, cond: Conditioning, hooks: RunHooks) -> WindowResult:
        """x: B,C,h,w in 0..1 on the weights' device (any float dtype) -> WindowResult at `scale`."""

    def describe(self) -> dict:
        """What a receipt quotes about the model (source, impl, native scale, dtypes)."""


def merge_reports(*parts: dict) -> dict:
    """One window's report from its stages' own reports (each stage returns what it did): their keys side by
    side, their out-of-memory `retries` in order."""
    merged: dict = {}
    retries: list = []
    for part in parts:
        retries += part.get("retries", [])
        merged.update((k, v) for k, v in part.items() if k != "retries")
    return {**merged, "retries": retries}


@dataclass(frozen=True)
class Backend:
    """A registered family (upscalers/backends.py): how to recognise its models cheaply and how to load one."""

    id: str
    impl: Impl
    detect: Callable[[Path], bool]  # is this file/folder one of this family's models (cheap: headers only)
    load: Callable[..., Upscaler]  # load(path, dtype=, device=, **options)
    options: tuple[str, ...] = ()  # load-time options this family takes (others are not passed to it)

    def __post_init__(self):
        object.__setattr__(self, "impl", Impl(self.impl))
