"""Inputs and categories every node family shares: the upscaler socket, tile / overlap / resample, seeds."""
from __future__ import annotations

from ..tiling.resample import METHODS as RESAMPLE_METHODS
from ..upscalers.contract import Impl
from ..upscalers.impl_policy import AUTO_OVERLAP
from .bridge import UPSCALER, Choice, advanced, io

CATEGORY = "DreamForge/upscale"
ZOOM_CATEGORY = "DreamForge/zoom"
SEED_MAX = 0xFFFFFFFFFFFFFFFF


def upscaler_input(name: str, tooltip: str) -> io.Input:
    """Our UPSCALER or ComfyUI's UPSCALE_MODEL on one socket ("UPSCALER,UPSCALE_MODEL" in /object_info)."""
    return io.MultiType.Input(name, types=[UPSCALER, io.UpscaleModel], tooltip=tooltip)


TILE_TOOLTIP = ("Tile side in input pixels, for every model (converted inside: SD x4's latent is the input's size, "
                "Chain-of-Zoom's model tiles a latent of half the input's size). 0 = auto: the largest tile that fits "
                "free memory (one pass when the whole image fits).")
OVERLAP_TOOLTIP = (f"Blend between tiles in input pixels, at least this much (cos²). 0 = auto: {AUTO_OVERLAP[Impl.GAN]} "
                   f"for a GAN, {AUTO_OVERLAP[Impl.DIFFUSION]} for SD x4 and Chain-of-Zoom's model (its "
                   f"{AUTO_OVERLAP[Impl.DIFFUSION] // 2} latent px). Each GAN tile also reads the context its "
                   "architecture needs.")


def overlap_input(max_value: int = 512) -> io.Input:
    """`overlap` on every node that has one: input pixels, 0 = auto (AUTO_OVERLAP by the kind that runs)."""
    return advanced(io.Int.Input("overlap", default=0, min=0, max=max_value, step=1, tooltip=OVERLAP_TOOLTIP))


def tiling_inputs() -> list[io.Input]:
    return [
        io.Int.Input("tile", default=0, min=0, max=8192, step=8, tooltip=TILE_TOOLTIP),
        overlap_input(),
        advanced(Choice("resample", options=list(RESAMPLE_METHODS), default="lanczos",
                        tooltip="Filter for scales other than the model's native one.")),
    ]
