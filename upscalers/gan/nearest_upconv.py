"""Nearest-neighbour upsampling followed by a 3x3 convolution, computed on the low-resolution map.

ESRGAN-family heads upsample by repeating pixels (nn.Upsample(mode="nearest")) and then convolve. On
the repeated map most taps of the 3x3 kernel read the same low-resolution pixel, so the same output is
a set of `s*s` small convolutions of the low-resolution map, one per output phase (row i = s*p + a), with
the taps that land on the same source pixel summed into one weight ("sub-pixel" form). For s = 2 that
is 16 instead of 36 multiply-adds per output pixel and channel pair, and the s*s-times larger upsampled
map is never built. The result equals the original up to float rounding (summation order); the loader
checks that on a small input before it keeps the rewrite (`rewrite_checked`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _taps(phase: int, scale: int) -> tuple[int, torch.Tensor]:
    """For output phase `phase` of a 3x3 kernel after `scale`x nearest upsampling: the first
    low-resolution offset it reads and the (n_offsets x 3) 0/1 matrix summing kernel taps per offset."""
    offsets = [(phase + d) // scale for d in (-1, 0, 1)]
    first = offsets[0]
    matrix = torch.zeros(offsets[-1] - first + 1, 3)
    for tap, offset in enumerate(offsets):
        matrix[offset - first, tap] = 1.0
    return first, matrix


class NearestUpConv(nn.Module):
    """`conv(nearest_upsample(x, scale))` for a 3x3, stride 1, zero-padding 1 conv, per output phase."""

    def __init__(self, conv: nn.Conv2d, scale: int):
        super().__init__()
        self.scale = scale
        self.out_channels = conv.out_channels
        weight = conv.weight.detach()
        self.phases: list[tuple[int, int, int, int]] = []  # (row phase, col phase, first row offset, first col)
        for a in range(scale):
            row0, rows = _taps(a, scale)
            for b in range(scale):
                col0, cols = _taps(b, scale)
                w = torch.einsum("rk,oikl,cl->oirc", rows.to(weight), weight, cols.to(weight))
                self.register_buffer(f"w{a}_{b}", w.contiguous())
                self.phases.append((a, b, row0, col0))
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        s = self.scale
        padded = F.pad(x, (1, 1, 1, 1))  # zero padding of the upsampled map = zero padding here
        fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        out = torch.empty(n, self.out_channels, h * s, w * s, dtype=x.dtype, device=x.device, memory_format=fmt)
        for a, b, row0, col0 in self.phases:
            weight = getattr(self, f"w{a}_{b}")
            kh, kw = weight.shape[-2:]
            window = padded[:, :, 1 + row0 : 1 + row0 + h + kh - 1, 1 + col0 : 1 + col0 + w + kw - 1]
            out[:, :, a::s, b::s] = F.conv2d(window, weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        return out


def _nearest_scale(module: nn.Module) -> int:
    """The integer factor of a nearest nn.Upsample (same on both axes), else 0."""
    if not isinstance(module, nn.Upsample) or module.mode != "nearest" or module.size is not None:
        return 0
    factor = module.scale_factor
    factors = factor if isinstance(factor, tuple) else (factor, factor)
    if len(set(factors)) != 1 or float(factors[0]) != int(factors[0]) or int(factors[0]) < 2:
        return 0
    return int(factors[0])


def _plain_3x3(conv: nn.Module) -> bool:
    return (type(conv) is nn.Conv2d and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros")


def _conv_slot(module: nn.Module) -> tuple[nn.Module | None, str]:
    """Where the conv that directly follows an upsample sits: (None, "") when `module` is that conv
    (its slot is the caller's), or the first child of a Sequential (spandrel's conv_block wraps the
    conv with its activation)."""
    if isinstance(module, nn.Sequential) and len(module) and _plain_3x3(module[0]):
        return module, next(iter(module._modules))
    return None, ""


Undo = list[tuple[nn.Module, str, nn.Module]]  # (container, child name, original child)


def _pairs(model: nn.Module):
    """(container of the upsample, its name, container of the conv, its name, scale) for each pair."""
    for parent in list(model.modules()):
        if not isinstance(parent, nn.Sequential):
            continue
        names = list(parent._modules)
        for up_name, next_name in zip(names, names[1:]):
            scale = _nearest_scale(parent._modules[up_name])
            if not scale:
                continue
            following = parent._modules[next_name]
            slot, key = (parent, next_name) if _plain_3x3(following) else _conv_slot(following)
            if slot is not None:
                yield parent, up_name, slot, key, scale


def rewrite_nearest_upconvs(model: nn.Module) -> Undo:
    """Replace every nearest-Upsample + 3x3 conv pair inside nn.Sequential containers, in place.
    Returns what `undo` needs to put the original modules back (empty: the model has no such pair)."""
    changes: Undo = []
    for parent, up_name, slot, key, scale in list(_pairs(model)):
        changes += [(slot, key, slot._modules[key]), (parent, up_name, parent._modules[up_name])]
        slot._modules[key] = NearestUpConv(slot._modules[key], scale)
        parent._modules[up_name] = nn.Identity()
    return changes


def undo(changes: Undo) -> None:
    for container, name, original in reversed(changes):
        container._modules[name] = original


def rewrite_checked(model: nn.Module, probe: torch.Tensor, tolerance: float = 1e-4) -> int:
    """Rewrite, then keep the rewrite only if it reproduces the original on `probe` (max deviation at most
    `tolerance` x the output's range, float rounding); returns the number of pairs kept."""
    if next(_pairs(model), None) is None:
        return 0  # nothing to rewrite: no probe pass
    with torch.inference_mode():
        reference = model(probe)
        changes = rewrite_nearest_upconvs(model)
        try:
            rewritten = model(probe)
            scale = max(1.0, float(reference.abs().max()))
            ok = rewritten.shape == reference.shape and float((rewritten - reference).abs().max()) <= tolerance * scale
        except Exception:  # noqa: BLE001 - any failure of the rewritten model means: keep the original
            ok = False
    if not ok:
        undo(changes)
        return 0
    return len(changes) // 2
