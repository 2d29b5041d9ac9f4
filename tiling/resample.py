"""Exact-size, antialiased resampling of B,H,W,C float images."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

METHODS = ("lanczos", "bicubic")


def target_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """round(H*s) x round(W*s), never below one pixel."""
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize(image: torch.Tensor, height: int, width: int, method: str = "lanczos") -> torch.Tensor:
    """Resize B,H,W,C float to exactly height x width; antialiased when shrinking; clamped to 0..1."""
    if method not in METHODS:
        raise ValueError(f"resample method must be one of {METHODS}, got {method!r}")
    if tuple(image.shape[1:3]) == (height, width):
        return image
    if method == "bicubic":
        out = F.interpolate(image.permute(0, 3, 1, 2).float(), size=(height, width), mode="bicubic",
                            align_corners=False, antialias=True)
        return out.clamp_(0, 1).permute(0, 2, 3, 1)
    # PIL resamples float32 ('F') planes exactly; its Lanczos widens the kernel when shrinking.
    planes = image.detach().float().cpu().numpy()
    out = np.empty((image.shape[0], height, width, image.shape[3]), dtype=np.float32)
    for b in range(planes.shape[0]):
        for ch in range(planes.shape[3]):
            plane = Image.fromarray(np.ascontiguousarray(planes[b, :, :, ch]), mode="F")
            out[b, :, :, ch] = np.asarray(plane.resize((width, height), Image.Resampling.LANCZOS))
    return torch.from_numpy(out).clamp_(0, 1).to(image.device)


def split_alpha(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """B,H,W,C IMAGE -> (RGB, alpha or None): grey is expanded to RGB, RGBA's alpha is split off."""
    channels = image.shape[-1]
    rgb = image[..., :3] if channels >= 3 else image.expand(-1, -1, -1, 3)
    return rgb, (image[..., 3:] if channels == 4 else None)


def attach_alpha(rgb: torch.Tensor, alpha: torch.Tensor | None) -> torch.Tensor:
    """Re-attach an alpha split off by `split_alpha`, resized (bicubic) to the RGB's size."""
    if alpha is None:
        return rgb
    return torch.cat([rgb, resize(alpha.float(), rgb.shape[1], rgb.shape[2], "bicubic").to(rgb)], dim=-1)


ALPHA_NOTE = "resampled separately (bicubic)"
