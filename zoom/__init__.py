"""Chain-of-Zoom pieces; for now the colour fix every zoom step (and any upscale) can use."""
from .color_fix import METHODS as COLOR_FIX_METHODS, color_fix

__all__ = ["COLOR_FIX_METHODS", "color_fix"]
