"""GroupNorm with statistics given from outside (shared by every window of a tiled VAE pass)."""
from __future__ import annotations

import torch


def group_moments(norm: torch.nn.GroupNorm, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image and group: mean and biased variance, B,G float32.

    From per-channel moments (law of total variance; a group's channels have equal counts), so a
    channels_last activation is read in place instead of copied into a group-major layout.
    """
    var_c, mean_c = torch.var_mean(x.float(), dim=tuple(range(2, x.ndim)), unbiased=False)
    mean_c, var_c = (t.reshape(x.shape[0], norm.num_groups, -1) for t in (mean_c, var_c))
    mean = mean_c.mean(-1)
    return mean, (var_c + (mean_c - mean[..., None]) ** 2).mean(-1)


def normalise(norm: torch.nn.GroupNorm, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """GroupNorm with given statistics as one per-channel multiply-add (one pass over x, its memory format kept)."""
    per_group = x.shape[1] // norm.num_groups
    scale = torch.rsqrt(var + norm.eps).repeat_interleave(per_group, dim=1)  # B,C
    shift = -mean.repeat_interleave(per_group, dim=1) * scale
    if norm.affine:
        scale, shift = scale * norm.weight.float(), shift * norm.weight.float() + norm.bias.float()
    shape = scale.shape + (1,) * (x.ndim - 2)
    return torch.addcmul(shift.reshape(shape), x.float(), scale.reshape(shape)).to(x.dtype)


def channel_sums(part: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per image and channel: (sum, sum of squares) in float64 and the pixel count of `part` (B,C,H,W).

    From one float32 var_mean pass over the activation (no float64 copy of it); summed across windows
    in float64 so that many windows add up without losing the variance."""
    n = part.shape[-1] * part.shape[-2]
    var_c, mean_c = (t.double() for t in torch.var_mean(part.float(), dim=(2, 3), unbiased=False))
    return mean_c * n, (var_c + mean_c * mean_c) * n, n


def group_stats(norm: torch.nn.GroupNorm, s1: torch.Tensor, s2: torch.Tensor,
                n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image and group: mean and biased variance (float32) from per-channel sums over n pixels."""
    groups = norm.num_groups
    b = s1.shape[0]
    count = n * (s1.shape[1] // groups)
    mean = s1.reshape(b, groups, -1).sum(-1) / count
    var = (s2.reshape(b, groups, -1).sum(-1) / count - mean**2).clamp_min(0)
    return mean.float(), var.float()
