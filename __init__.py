"""DreamForge Upscale: seam-free, memory-aware upscaling nodes for ComfyUI."""
import importlib.util

if importlib.util.find_spec("comfy") is not None:
    from .nodes.comfy_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:  # imported outside ComfyUI (pytest, the command line): backends only, no nodes to register
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
