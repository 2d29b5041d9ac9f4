"""ComfyUI nodes. `comfy_nodes` is the bridge (the only module importing comfy.*); each family module
below defines NODE_CLASS_MAPPINGS / NODE_DISPLAY_NAME_MAPPINGS and is assembled by the pack's __init__."""

NODE_MODULES = ("comfy_nodes", "coz_model_nodes", "tagger_nodes")  # modules of this package holding nodes, in registration order
