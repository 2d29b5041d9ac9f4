"""DreamForge Upscale: seam-free, memory-aware upscaling nodes for ComfyUI."""
import importlib
import importlib.util

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
if importlib.util.find_spec("comfy") is not None:
    from .nodes import NODE_MODULES

    for _name in NODE_MODULES:
        _module = importlib.import_module(f".nodes.{_name}", __name__)
        NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
        NODE_DISPLAY_NAME_MAPPINGS.update(_module.NODE_DISPLAY_NAME_MAPPINGS)
# Imported outside ComfyUI (pytest, the command line): backends only, no nodes to register.

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
