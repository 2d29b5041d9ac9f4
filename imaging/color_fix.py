"""Colour correction of an upscaled image against a reference, as Chain-of-Zoom publishes it.

wavelet: 5 levels of a dilated 3x3 binomial blur (replicate padding); keep the image's high
frequencies and the reference's low frequencies. adain: match per-channel mean/std (eps 1e-5,
unbiased variance). Images are B,H,W,C float in 0..1; the reference is resized to the image first.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..tiling.resample import attach_alpha, resize, split_alpha

METHODS = ("wavelet", "adain")
WAVELET_LEVELS = 5
ADAIN_EPS = 1e-5
PLANE_WISE_ABOVE = 3 * 1024 * 1024  # values per image above which the wavelet fix runs plane by plane
_BINOMIAL = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16.0


def wavelet_blur(x: torch.Tensor, radius: int) -> torch.Tensor:
    """x: B,C,H,W. 3x3 binomial blur with dilation `radius`, replicate padding."""
    channels = x.shape[1]
    kernel = _BINOMIAL.to(x)[None, None].repeat(channels, 1, 1, 1)
    padded = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    return F.conv2d(padded, kernel, groups=channels, dilation=radius)


def wavelet_low(x: torch.Tensor, levels: int = WAVELET_LEVELS) -> torch.Tensor:
    """The low frequencies: the blur cascade (dilation 1, 2, 4, ...); the details are x - low."""
    for i in range(levels):
        x = wavelet_blur(x, 2**i)
    return x


def wavelet_fix(content: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """high(content) + low(reference).

    The per-level details telescope (high = x - low) and the blur is linear, so this equals
    content + low(reference - content): one blur cascade instead of two. A large image (a 4096 px
    Chain-of-Zoom pass) runs one plane at a time: a few single-channel buffers, not whole copies.
    """
    if content[0].numel() <= PLANE_WISE_ABOVE:
        low = wavelet_low(reference - content)
        return low.add_(content)
    out = torch.empty_like(content, memory_format=torch.contiguous_format)
    for b in range(content.shape[0]):
        for c in range(content.shape[1]):
            plane = content[b : b + 1, c : c + 1]
            low = wavelet_low(reference[b : b + 1, c : c + 1] - plane)
            out[b : b + 1, c : c + 1] = low.add_(plane)
    return out


def adain_fix(content: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    def mean_std(x):
        flat = x.flatten(2)
        # unbiased as published; a single pixel has no spread (unbiased would divide by zero: NaN)
        var = flat.var(dim=2, unbiased=flat.shape[2] > 1)
        return flat.mean(dim=2)[..., None, None], (var + ADAIN_EPS).sqrt()[..., None, None]

    c_mean, c_std = mean_std(content)
    r_mean, r_std = mean_std(reference)
    return (content - c_mean) / c_std * r_std + r_mean


def color_fix(image: torch.Tensor, reference: torch.Tensor, method: str = "wavelet") -> torch.Tensor:
    """Correct `image`'s colours towards `reference` (both B,H,W,C float). Alpha of `image` is kept."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}")
    for name, t in (("image", image), ("reference", reference)):
        if t.ndim != 4 or t.shape[0] == 0 or t.shape[1] == 0 or t.shape[2] == 0:
            raise ValueError(f"{name} must be a non-empty IMAGE [batch, height, width, channels]; got {tuple(t.shape)}")
    if reference.shape[0] not in (1, image.shape[0]):
        raise ValueError(
            f"reference batch ({reference.shape[0]}) must be 1 or match the image batch ({image.shape[0]})"
        )
    rgb, alpha = split_alpha(image)
    rgb = rgb.float()
    ref = resize(split_alpha(reference)[0].float(), rgb.shape[1], rgb.shape[2], "bicubic").to(rgb.device)
    ref = ref.expand(rgb.shape[0], -1, -1, -1)
    fix = wavelet_fix if method == "wavelet" else adain_fix
    out = fix(rgb.permute(0, 3, 1, 2), ref.permute(0, 3, 1, 2)).clamp_(0, 1).permute(0, 2, 3, 1)
    return attach_alpha(out, alpha)
