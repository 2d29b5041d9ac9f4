"""The registered backend families, and loading a model file or folder with the one it belongs to.

Each family is one folder under upscalers/ (gan/, sdx4/, coz_sd3/) exposing a `BACKEND`: how to recognise
its models cheaply (headers, configs) and how to load one into an object that keeps the upscaler contract
(upscalers/contract.py, which also defines the `Backend` descriptor). A new family is its folder plus one line in BACKENDS.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..runtime.devices import default_device
from .contract import Backend, Impl, Upscaler
from .coz_sd3 import BACKEND as COZ_SD3
from .gan import BACKEND as GAN
from .impl_policy import resolve_load_impl
from .sdx4 import BACKEND as SDX4

FAMILIES: tuple[Backend, ...] = (SDX4, COZ_SD3, GAN)  # first match wins; spandrel (GAN) recognises the rest


def backend_for(path: str | os.PathLike) -> Backend:
    path = Path(path)
    return next((b for b in FAMILIES if b.detect(path)), FAMILIES[-1])


def load_model_path(path: str | os.PathLike, *, impl: str = "auto", dtype: str = "auto",
                    device: torch.device | None = None, **options) -> Upscaler:
    """Load `path` with its family's backend. impl auto follows the file; gan / diffusion insist on that kind
    (an error names the mismatch). Options a family does not take are not passed to it (they are SD x4's
    attention_slicing / offload, or the Chain-of-Zoom model's LoRA files)."""
    path = Path(path)
    backend = backend_for(path)
    resolve_load_impl(impl, backend.impl is Impl.DIFFUSION, path.name)
    device = device or default_device()
    given = {k: v for k, v in options.items() if k in backend.options}
    return backend.load(path, dtype=dtype, device=device, **given)


def is_diffusion_model(path: str | os.PathLike) -> bool:
    return backend_for(path).impl is Impl.DIFFUSION


__all__ = ["Backend", "backend_for", "is_diffusion_model", "load_model_path"]

