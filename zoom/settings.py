"""Chain-of-Zoom's settings and every check on them, in one place: a Step, a Loop and the full-image zoom
validate the same way before any work."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..imaging.color_fix import METHODS as FIX_METHODS
from ..runtime.errors import UpscalerError
from ..tiling import RunHooks
from ..upscalers.contract import RunMemo, Upscaler
from .geometry import DEFAULT_PROCESS_SIZE, MODES, PROCESS_SIZE_MULTIPLE, SR_MODES, ZOOM, step_factor
from .prompts import PromptProvider

COLOR_FIX_CHOICES = (*FIX_METHODS, "none")
SAMPLING_CHOICES = ("sample", "mean")  # Chain-of-Zoom's own model: its posterior sample (the paper) or mean


def derive_seed(seed: int, *path: int) -> int:
    """A 63-bit seed for one unit of work (step, image, pass...) from the user's seed: stable, well mixed."""
    if not isinstance(seed, int) or seed < 0:
        raise UpscalerError(f"seed must be a non-negative integer; got {seed!r}")
    state = np.random.SeedSequence(seed, spawn_key=tuple(int(p) for p in path)).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & (2**63 - 1)


def check_zoom_upscaler(upscaler: Upscaler) -> None:
    if upscaler.scale != ZOOM:
        raise UpscalerError(
            f"Chain-of-Zoom zooms 4x per step and needs a 4x upscaler; {upscaler.source.file} is native "
            f"x{upscaler.scale}. Load a 4x model (e.g. realesr-animevideov3.pth, RealESRGAN_x4plus.pth or the "
            "Stable Diffusion x4 upscaler)."
        )


def check_color_fix(method: str) -> str:
    if method not in COLOR_FIX_CHOICES:
        raise UpscalerError(f"color_fix must be one of {', '.join(COLOR_FIX_CHOICES)}; got {method!r}")
    return method


def check_sampling(sampling: str) -> str:
    if sampling not in SAMPLING_CHOICES:
        raise UpscalerError(f"sampling must be one of {', '.join(SAMPLING_CHOICES)} (sample: the paper's posterior "
                            f"sample, seeded; mean: the posterior mean, no noise); got {sampling!r}")
    return sampling


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise UpscalerError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    return mode


def check_process_size(size: int) -> int:
    if not isinstance(size, int) or size < 2 * PROCESS_SIZE_MULTIPLE or size % PROCESS_SIZE_MULTIPLE:
        raise UpscalerError(
            f"process_size must be a multiple of {PROCESS_SIZE_MULTIPLE} and at least {2 * PROCESS_SIZE_MULTIPLE} "
            f"(the published default is {DEFAULT_PROCESS_SIZE}); got {size!r}"
        )
    return size


def check_step(mode: str, step: int, size: int) -> None:
    if not isinstance(step, int) or step < 1:
        raise UpscalerError(f"step must be 1 or more (step n makes scale-state x_n); got {step!r}")
    factor = step_factor(mode, step)
    if size // factor < 1:
        raise UpscalerError(
            f"mode {mode} at step {step} crops the centre 1/{factor} of x0, under one pixel of a "
            f"{size}px process size: use fewer steps or a larger process_size (at least {factor})"
        )


@dataclass
class ZoomSettings:
    """Everything about a zoom run except the images (shared by Step and Loop so both do the same)."""

    mode: str = "recursive_multiscale"
    process_size: int = DEFAULT_PROCESS_SIZE
    user_prompt: str = ""
    provider: PromptProvider | None = None
    color_fix: str = "wavelet"
    seed: int = 0
    sampling: str = "sample"  # Chain-of-Zoom's own model: "sample" (the paper, seeded) or "mean" (no noise)
    tile: int = 0  # input px for every upscaler (converted for the latent-tiled models); 0 = auto
    overlap: int = 0  # input px; 0 = auto (impl_policy.AUTO_OVERLAP)
    device: torch.device | None = None
    hooks: RunHooks = field(default_factory=RunHooks)
    memo: RunMemo = field(default_factory=RunMemo)  # reusable work (prompt embeddings) across one run's steps

    def check(self, upscaler: Upscaler | None) -> None:
        check_mode(self.mode)
        check_process_size(self.process_size)
        check_color_fix(self.color_fix)
        check_sampling(self.sampling)
        derive_seed(self.seed)
        if self.mode in SR_MODES:
            if upscaler is None:
                raise UpscalerError(f"mode {self.mode} needs an upscaler (only nearest/bicubic run without one)")
            check_zoom_upscaler(upscaler)
