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
