"""Which implementation runs a request, and how a requested scale maps onto native passes."""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

from ..runtime.errors import UpscalerError
from .contract import Capabilities, Impl

IMPLS = ("auto", "diffusion", "gan")
# operators: the default of Tiled Upscale's impl policy (auto/diffusion/gan). Never Load Upscaler's impl, which
# only insists on the kind of the file chosen: a default there would make every new loader fail on the other kind.
ENV_DEFAULT_IMPL = "DREAMFORGE_DEFAULT_IMPL"
DIFFUSION_NATIVE = 4
AUTO_DIFFUSION_FROM = 3.0  # auto with SD x4 connected: scales below this run a folder GAN, from it up SD x4
# The nodes' `overlap` 0 = auto, in input px: a GAN's feather, and SD x4's / Chain-of-Zoom's latent blend
# (SD x4: latent = input px, 32 = its sampler's default; Chain-of-Zoom's model: latent = input / 2, so 32 input
# px = the authors' 16 latent px).
AUTO_OVERLAP = {Impl.GAN: 16, Impl.DIFFUSION: 32}


def check_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise UpscalerError(f"impl must be one of {', '.join(IMPLS)}; got {impl!r}")
    return impl


def default_impl() -> str:
    value = os.environ.get(ENV_DEFAULT_IMPL, "auto").strip().lower() or "auto"
    if value not in IMPLS:
        raise UpscalerError(f"{ENV_DEFAULT_IMPL}={value!r}: set it to one of {', '.join(IMPLS)} (or unset it)")
    return value


def overlap_for(impl: Impl, overlap: int) -> int:
    """A node's overlap in input px: as given when > 0, else (0 = auto) AUTO_OVERLAP for the kind that runs."""
    return overlap if overlap > 0 else AUTO_OVERLAP[impl]


def resolve_load_impl(impl: str, is_diffusion_model: bool, name: str) -> Impl:
    """What Load Upscaler loads: auto follows the model; an explicit impl must match it."""
    check_impl(impl)
    found = Impl.DIFFUSION if is_diffusion_model else Impl.GAN
    if impl in ("auto", found):
        return found
    if impl == Impl.DIFFUSION:
        raise UpscalerError(
            f"impl 'diffusion' needs the Stable Diffusion x4 upscaler, but {name} is a GAN model. Choose "
            "x4-upscaler-ema.safetensors (models/checkpoints or models/upscale_models) or its diffusers folder "
            "(models/diffusers), or set impl to 'gan' / 'auto'."
        )
    raise UpscalerError(f"impl 'gan': {name} is the Stable Diffusion x4 upscaler (a diffusion model); "
                        "set impl to 'diffusion' or 'auto', or choose a GAN model.")


@dataclass(frozen=True)
class RunChoice:
    impl: Impl
    use_loaded: bool  # run the connected upscaler (else a GAN found in the model folders)
    gan_scale: int  # preferred native scale of that GAN (2 or 4)
    reason: str


def choose_run(impl: str, scale: float | None, loaded_impl: Impl) -> RunChoice:
    """Which implementation a Tiled Upscale request runs, given what is connected (`loaded_impl`).

    A connected GAN always runs, under every policy but diffusion (which refuses it): the model the user
    connected is what runs, at any scale (a 4x GAN at scale 2 runs 4x, then an exact downsample); to run
    RealESRGAN_x2plus, connect it. Only with the SD x4 model connected may another model run: auto runs a
    GAN from models/upscale_models below scale 3 (pick_gan: RealESRGAN_x2plus when installed, else a 4x
    GAN, else the bundled model) and SD x4 from 3 up; gan always runs that folder GAN. diffusion: the
    connected SD x4 model (scale 2 runs x4 then downsamples unless strict_scale). Scale 0 = the connected
    model's native scale.
    """
    check_impl(impl)
    loaded_impl = Impl(loaded_impl)
    target = float(scale) if scale else float(DIFFUSION_NATIVE if loaded_impl is Impl.DIFFUSION else 0)
    gan_scale = 2 if 0 < target < AUTO_DIFFUSION_FROM else 4
    if impl == Impl.DIFFUSION:
        if loaded_impl is not Impl.DIFFUSION:
            raise UpscalerError(
                "impl 'diffusion' needs the Stable Diffusion x4 upscaler: load it with 'Load Upscaler' (impl "
                "diffusion or auto) and connect that, or set impl to 'gan' / 'auto'."
            )
        return RunChoice(Impl.DIFFUSION, True, gan_scale, "impl diffusion")
    if loaded_impl is Impl.GAN:
        return RunChoice(Impl.GAN, True, gan_scale, f"impl {impl}: the connected GAN model")
    if impl == Impl.GAN:
        return RunChoice(Impl.GAN, False, gan_scale, "impl gan: the connected upscaler is the diffusion model, so a GAN "
                                                  "from models/upscale_models runs instead")
    if target < AUTO_DIFFUSION_FROM:
        return RunChoice(Impl.GAN, False, gan_scale, f"impl auto: scale {target:g} < {AUTO_DIFFUSION_FROM:g} runs a GAN "
                                                  "(faster, and SD x4 is trained for 4x)")
    return RunChoice(Impl.DIFFUSION, True, gan_scale, f"impl auto: scale {target:g} runs the diffusion model")


def strict_scale_error(impl: str, scale: float | None) -> str | None:
    """Before any work (and as a queue-time validation): impl diffusion only makes 4x and its powers."""
    if impl != Impl.DIFFUSION or not scale:
        return None
    passes = round(math.log(scale, DIFFUSION_NATIVE)) if scale > 0 else 0
    if passes >= 1 and math.isclose(DIFFUSION_NATIVE**passes, scale, rel_tol=0, abs_tol=1e-9):
        return None
    return (f"strict_scale: impl diffusion (SD x4 upscaler, native x4) cannot produce scale {scale:g} natively; "
            "use scale 4 (or 16), untick strict_scale to downsample/resample, or choose impl gan/auto.")


_GAN_NAMES = {2: ("RealESRGAN_x2plus",), 4: ("RealESRGAN_x4plus", "4x-UltraSharp", "RealESRGAN_x4plus_anime_6B")}


def pick_gan(names: list[str], native: int) -> str | None:
    """The GAN file to run for a native scale: Real-ESRGAN first, then any name saying x2/x4 (2x falls back to 4x)."""
    def score(name: str, want: int) -> int | None:
        stem = os.path.splitext(os.path.basename(name))[0]
        if stem in _GAN_NAMES.get(want, ()):
            return _GAN_NAMES[want].index(stem)
        if re.search(rf"(^|[^0-9])(x{want}|{want}x)([^0-9]|$)", stem, re.IGNORECASE):
            return 100
        return None

    for want in ((2, 4) if native == 2 else (4,)):
        ranked = sorted((s, n) for n in names if (s := score(n, want)) is not None)
        if ranked:
            return ranked[0][1]
    return None


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
