"""Test-only ComfyUI nodes, installed into custom_nodes by the integration-test harness only.

DreamForgeTestImage turns a real IMAGE into the awkward ones other nodes can emit (empty, NaN, RGBA,
batches), so error paths and alpha/batch handling are driven through the real server.
DreamForgeTestSaveText is an output node that writes a STRING (a receipt) to the output folder as
JSON and reports it in /history. DreamForgeTestOutOfMemory wraps an UPSCALER so that every model call
runs out of memory (fault injection for the fallback paths through the real server).
"""
import dataclasses
import json
import os

import torch

import folder_paths

MODES = ("empty", "nan", "rgba", "batch")


class DreamForgeTestImage:
    CATEGORY = "DreamForge/testing"
    FUNCTION = "make"
    RETURN_TYPES = ("IMAGE",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE",),
            "mode": (list(MODES),),
            "count": ("INT", {"default": 2, "min": 1, "max": 64}),
        }}

    def make(self, image, mode, count):
        b, h, w, _ = image.shape
        rgb = image[..., :3].float()
        if mode == "empty":
            return (torch.zeros(1, 0, 0, 3),)
        if mode == "nan":
            out = rgb.clone()
            out[:, : max(1, h // 4), : max(1, w // 4), :] = float("nan")
            return (out,)
        if mode == "rgba":
            # alpha: a horizontal ramp 0..1 (left transparent, right opaque)
            ramp = torch.linspace(0.0, 1.0, w).view(1, 1, w, 1).expand(b, h, w, 1)
            return (torch.cat([rgb, ramp.to(rgb)], dim=-1),)
        if mode == "batch":
            # distinct images: the input and its mirror images
            frames = [rgb, rgb.flip(2), rgb.flip(1), rgb.flip(1).flip(2)]
            return (torch.cat([frames[i % 4] for i in range(count)], dim=0),)
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}")


class DreamForgeTestSaveText:
    CATEGORY = "DreamForge/testing"
    FUNCTION = "save"
    RETURN_TYPES = ()
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text": ("STRING", {"forceInput": True}),
            "filename_prefix": ("STRING", {"default": "receipt"}),
        }}

    def save(self, text, filename_prefix):
        out_dir = folder_paths.get_output_directory()
        n = 0
        while os.path.exists(os.path.join(out_dir, f"{filename_prefix}_{n:05}.json")):
            n += 1
        name = f"{filename_prefix}_{n:05}.json"
        try:
            payload = json.loads(text)
        except ValueError:
            payload = {"text": text}
        with open(os.path.join(out_dir, name), "w") as fh:
            json.dump(payload, fh, indent=1)
        return {"ui": {"text": [text], "files": [{"filename": name, "subfolder": "", "type": "output"}]}}


class _OutOfMemory:
    """The wrapped upscaler in every respect, except that its model calls run out of memory."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def upscale_window(self, x, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB (injected by the test node)")


class DreamForgeTestOutOfMemory:
    CATEGORY = "DreamForge/testing"
    FUNCTION = "wrap"
    RETURN_TYPES = ("UPSCALER",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"upscaler": ("UPSCALER",)}}

    def wrap(self, upscaler):
        return (dataclasses.replace(upscaler, upscaler=_OutOfMemory(upscaler.upscaler)),)


class DreamForgeTestNodeKinds:
    """Reports, from inside the server, which registered DreamForge nodes are V3 (io.ComfyNode) classes."""

    CATEGORY = "DreamForge/testing"
    FUNCTION = "report"
    RETURN_TYPES = ()
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    @classmethod
    def IS_CHANGED(cls):
        return float("nan")  # report the registry as it is now, never a cached answer

    def report(self):
        import nodes
        from comfy_api.latest import io

        ours = {k: v for k, v in nodes.NODE_CLASS_MAPPINGS.items()
                if k.startswith("DreamForge") and not k.startswith("DreamForgeTest")}
        kinds = {k: ("v3" if isinstance(v, type) and issubclass(v, io.ComfyNode) else "v1") for k, v in ours.items()}
        return {"ui": {"kinds": [kinds]}}


NODE_CLASS_MAPPINGS = {
    "DreamForgeTestImage": DreamForgeTestImage,
    "DreamForgeTestSaveText": DreamForgeTestSaveText,
    "DreamForgeTestOutOfMemory": DreamForgeTestOutOfMemory,
    "DreamForgeTestNodeKinds": DreamForgeTestNodeKinds,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "DreamForgeTestImage": "Test Image (DreamForge tests)",
    "DreamForgeTestSaveText": "Save Text (DreamForge tests)",
    "DreamForgeTestOutOfMemory": "Out of Memory (DreamForge tests)",
    "DreamForgeTestNodeKinds": "Node Kinds (DreamForge tests)",
}
