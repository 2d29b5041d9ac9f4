"""The device a model runs on when the caller names none."""
from __future__ import annotations

import torch


def default_device() -> torch.device:
    """The first CUDA device when torch sees one, else the CPU (inside ComfyUI its memory manager decides)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
