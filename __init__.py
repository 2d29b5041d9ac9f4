"""DreamForge Upscale: seam-free, memory-aware upscaling nodes for ComfyUI.

Inside ComfyUI the pack is a V3 extension: ComfyUI calls `comfy_entrypoint()`. The pack defines no
NODE_CLASS_MAPPINGS on purpose (ComfyUI would then load it the legacy V1 way). Imported anywhere else
(pytest, the command line) it exposes the backends only and needs nothing from ComfyUI.
"""
import importlib.util

if importlib.util.find_spec("comfy") is not None and importlib.util.find_spec("comfy_api") is not None:
    from .nodes import comfy_entrypoint

    WEB_DIRECTORY = "./web"  # one frontend extension: seed controls that start at "fixed" (web/seed_control.js)
    __all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]
else:
    __all__ = []
