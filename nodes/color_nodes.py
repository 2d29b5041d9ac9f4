"""Colour family: Color Fix (backend imaging/color_fix.py)."""
from __future__ import annotations

from ..imaging.color_fix import METHODS, color_fix
from . import bridge
from .bridge import Choice, io, schema
from .shared_inputs import CATEGORY


class ColorFix(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="DreamForgeColorFix", display_name="Color Fix (DreamForge)", category=CATEGORY,
            description="Corrects colour shift of an upscaled image against a reference (e.g. the input): wavelet "
                        "keeps the image's detail and the reference's low frequencies; adain matches mean/std per "
                        "channel.",
            aliases=("color fix", "colour fix", "color match", "colour match", "color correction",
                     "colour correction", "wavelet", "adain"),
            inputs=[
                io.Image.Input("image", tooltip="The image to correct (e.g. the upscaled output)."),
                io.Image.Input("reference", tooltip="Colours to match; resized to the image first."),
                Choice("method", options=list(METHODS), default="wavelet",
                       tooltip="wavelet: keep the image's detail, take the reference's low frequencies (best after "
                               "SR). adain: match each channel's mean and std."),
            ],
            outputs=[io.Image.Output(display_name="image", tooltip="The image with the reference's colours.")],
        )

    @classmethod
    def execute(cls, image, reference, method) -> io.NodeOutput:
        return io.NodeOutput(bridge.to_output(color_fix(image, reference, method)))


NODES = [ColorFix]
