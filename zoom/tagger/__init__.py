"""DAPE / Recognize-Anything tag prompts for Chain-of-Zoom (the published `dape` prompt type).

RAM Swin-L (timm's swin_large_patch4_window12_384, no download) + its tagging head written here, DAPE's
LoRA merged at load, weights-only memory-mapped checkpoint loading. Runs without ComfyUI.
"""
from .provider import TaggerProvider, tagger_dtype
from .tags import TagOptions, Vocabulary, ram_vocabulary, select

__all__ = ["TaggerProvider", "tagger_dtype", "TagOptions", "Vocabulary", "ram_vocabulary", "select"]
