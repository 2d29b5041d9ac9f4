"""The ComfyUI bridge (comfy_nodes) — the only place that imports comfy.*."""
