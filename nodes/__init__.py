"""ComfyUI nodes (V3 schema), one module per family; `bridge` is the only module that talks to ComfyUI.

`comfy_entrypoint()` is what ComfyUI calls for a pack without NODE_CLASS_MAPPINGS: it returns the
extension, whose node list is every family's NODES. Imported only inside ComfyUI (see the pack's
__init__.py).
"""
from __future__ import annotations

from . import color_nodes, prompt_nodes, save_nodes, upscale_nodes, zoom_nodes
from .bridge import ComfyExtension, io, register_folders

FAMILIES = (upscale_nodes, save_nodes, zoom_nodes, prompt_nodes, color_nodes)  # registration order


class DreamForgeExtension(ComfyExtension):
    async def on_load(self) -> None:
        register_folders()  # newer servers call this first

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        # ComfyUI 0.3.75 never calls on_load; the loaders' choice lists need the folders, so register here too
        register_folders()
        return [node for family in FAMILIES for node in family.NODES]


async def comfy_entrypoint() -> DreamForgeExtension:
    return DreamForgeExtension()
