"""Which implementation runs a request, and how a requested scale maps onto native passes."""
from __future__ import annotations

import math
from dataclasses import dataclass

from .base import Capabilities, UpscalerError

IMPLS = ("auto", "diffusion", "gan")
AVAILABLE_IMPLS = ("gan",)  # diffusion (SD x4) is a later release


def resolve_load_impl(impl: str) -> str:
    """The implementation Load Upscaler loads for `impl`."""
    if impl not in IMPLS:
        raise UpscalerError(f"impl must be one of {', '.join(IMPLS)}; got {impl!r}")
    if impl == "auto":
        return "gan"
    if impl not in AVAILABLE_IMPLS:
        raise UpscalerError(
            f"impl {impl!r} (the Stable Diffusion x4 upscaler) is not available in this version of DreamForge "
            "Upscale yet; choose impl 'gan' or 'auto' with a GAN model from models/upscale_models."
        )
    return impl


@dataclass(frozen=True)
class ScalePlan:
    native: int  # the model's scale per pass
    passes: int  # chained native passes
    requested: float

    @property
    def reached(self) -> int:
        return self.native**self.passes

    @property
    def resample(self) -> bool:
        return not math.isclose(self.reached, self.requested, rel_tol=0, abs_tol=1e-9)


def plan_scale(caps: Capabilities, scale: float | None, strict: bool, label: str) -> ScalePlan:
    """Fewest native passes reaching `scale` (then an exact resample), or an error under strict_scale.

    strict_scale accepts only what the model does without resampling: its native scale or a power
    of it reached by chaining passes.
    """
    native = max(caps.native_scales)
    if scale is None or scale == 0:
        return ScalePlan(native, 1, float(native))
    if not math.isfinite(scale) or scale <= 0:
        raise UpscalerError(f"scale must be a positive number (0 = the model's native x{native}); got {scale}")
    if native == 1:
        passes = 1
    else:
        passes = max(1, math.ceil(math.log(scale, native) - 1e-9))
    plan = ScalePlan(native, passes, float(scale))
    if strict and plan.resample:
        raise UpscalerError(
            f"strict_scale: impl {caps.impl} ({label}, native x{native}) cannot produce scale {scale:g} natively; "
            f"use scale {native} (or a power of it), untick strict_scale to resample, or load a model whose native scale is {scale:g}."
        )
    return plan
