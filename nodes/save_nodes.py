"""Save family: Save Image + Receipt, core SaveImage that also keeps the upscale receipt with the file (a
receipt shown only in Preview as Text is gone once the image is saved)."""
from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from . import bridge
from .bridge import io, schema
from .shared_inputs import CATEGORY

RECEIPT_CHUNK = "dreamforge_receipt"  # PNG text chunk beside core's "prompt" and "workflow"
COMPRESS_LEVEL = 4  # core SaveImage's


def checked_receipt(receipt: str | None) -> str | None:
    """The receipt verbatim, once it is known to be JSON (a PNG chunk nobody can parse helps nobody)."""
    if receipt is None:
        return None
    try:
        json.loads(receipt)
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"receipt: expected the JSON receipt of a DreamForge upscale or zoom node, got text that is not JSON "
            f"({exc}; it starts {str(receipt)[:40]!r}). Connect the node's 'receipt' output here, or leave "
            f"receipt unconnected to save the image without one."
        ) from None
    return receipt


def png_info(prompt, extra_pnginfo, receipt: str | None) -> PngInfo:
    """What core SaveImage writes (prompt, each extra_pnginfo key such as the workflow), then the receipt."""
    info = PngInfo()
    if prompt is not None:
        info.add_text("prompt", json.dumps(prompt))
    for key, value in (extra_pnginfo or {}).items():
        info.add_text(key, json.dumps(value))
    if receipt is not None:
        info.add_text(RECEIPT_CHUNK, receipt)  # PIL switches to iTXt when the text is not latin-1
    return info


def save_images(images, filename_prefix: str, *, receipt: str | None = None, receipt_file: bool = False,
                prompt=None, extra_pnginfo=None, metadata: bool = True) -> list[dict]:
    """Core SaveImage's loop (names, counter, %batch_num%) plus the receipt in each PNG and, with
    receipt_file, in NAME.json beside it; metadata=False is --disable-metadata (the sidecar is still
    written: it is how such a server keeps receipts). The ui "images" entries, as core reports them."""
    receipt = checked_receipt(receipt)
    folder, stem, counter, subfolder = bridge.save_image_path(filename_prefix, images[0].shape[1],
                                                              images[0].shape[0])
    info = png_info(prompt, extra_pnginfo, receipt) if metadata else None
    results = []
    for batch_number, image in enumerate(images):
        pixels = np.clip(255.0 * image.cpu().numpy(), 0, 255).astype(np.uint8)
        name = f"{stem.replace('%batch_num%', str(batch_number))}_{counter:05}_"
        Image.fromarray(pixels).save(os.path.join(folder, name + ".png"), pnginfo=info, compress_level=COMPRESS_LEVEL)
        if receipt_file and receipt is not None:
            with open(os.path.join(folder, name + ".json"), "w", encoding="utf-8") as f:
                f.write(receipt)
        results.append({"filename": name + ".png", "subfolder": subfolder, "type": "output"})
        counter += 1
    return results


class SaveImageReceipt(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="DreamForgeSaveImage", display_name="Save Image + Receipt (DreamForge)", category=CATEGORY,
            description="Saves images to ComfyUI's output folder as Save Image does (prompt and workflow in the "
                        f"PNG), plus the connected receipt in the PNG's '{RECEIPT_CHUNK}' text chunk and, on "
                        "request, in NAME.json beside each image.",
            aliases=("save image", "save receipt", "receipt", "png metadata", "save with metadata"),
            inputs=[
                io.Image.Input("images", tooltip="The images to save."),
                io.String.Input("filename_prefix", default="DreamForge",
                                tooltip="The prefix for the file to save. This may include formatting information "
                                        "such as %date:yyyy-MM-dd% or %Empty Latent Image.width% to include values "
                                        "from nodes."),
                io.String.Input("receipt", optional=True, force_input=True,
                                tooltip="Connect an upscale or zoom node's receipt output: stored verbatim in each "
                                        f"PNG's '{RECEIPT_CHUNK}' chunk. Unconnected: a plain Save Image."),
                io.Boolean.Input("receipt_file", default=False, optional=True,
                                 tooltip="Also write NAME.json (the receipt) beside each image; written even when "
                                         "the server runs with --disable-metadata."),
            ],
            outputs=[],
            hidden=[io.Hidden.prompt, io.Hidden.extra_pnginfo],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, images, filename_prefix, receipt=None, receipt_file=False) -> io.NodeOutput:
        results = save_images(images, filename_prefix, receipt=receipt, receipt_file=receipt_file,
                              prompt=cls.hidden.prompt, extra_pnginfo=cls.hidden.extra_pnginfo,
                              metadata=not bridge.metadata_disabled())
        return io.NodeOutput(ui={"images": results})


NODES = [SaveImageReceipt]
