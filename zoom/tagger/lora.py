"""DAPE's LoRA (loralib, lora_alpha 1, rank r: scale 1/r = 1/8), merged into the weights at load.

- Swin `attn.qkv` is a loralib MergedLinear on Q and V only: lora_A (2r, dim), lora_B (2*dim, r);
  W[0:d] += B[:d] @ A[:r] / r (Q) and W[2d:3d] += B[d:] @ A[r:] / r (V); K untouched.
- A plain Linear (the tagging head's query and key): lora_A (r, in), lora_B (out, r); W += B @ A / r.
The merge runs in float32 (as the authors do) before any cast to fp16.
"""
from __future__ import annotations

import torch

from ...runtime.errors import UpscalerError

LORA_ALPHA = 1.0  # loralib's default, what SeeSR / DAPE train with
SUFFIXES = (".lora_A", ".lora_B")


def lora_pairs(weights: dict[str, torch.Tensor], what: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module name: (lora_A, lora_B)} for every module with both halves."""
    pairs = {}
    for key in weights:
        if key.endswith(".lora_A"):
            module = key[: -len(".lora_A")]
            if module + ".lora_B" not in weights:
                raise UpscalerError(f"{what}: {module} has lora_A but no lora_B; the DAPE file is incomplete")
            pairs[module] = (weights[key], weights[module + ".lora_B"])
    return pairs


def lora_delta(weight_shape: torch.Size, a: torch.Tensor, b: torch.Tensor, module: str, what: str) -> torch.Tensor:
    """The float32 update loralib's merge adds to a weight of `weight_shape`."""
    out_features, in_features = weight_shape
    rank = b.shape[1]
    groups = a.shape[0] // rank if rank else 0
    if rank == 0 or a.shape[1] != in_features or a.shape[0] != groups * rank or groups not in (1, 2):
        raise UpscalerError(f"{what}: LoRA for {module} has shapes A {tuple(a.shape)}, B {tuple(b.shape)}, which do "
                            f"not fit its weight {tuple(weight_shape)}; the DAPE file does not belong to this RAM model")
    a, b, scale = a.float(), b.float(), LORA_ALPHA / rank
    if groups == 1 and b.shape[0] == out_features:
        return (b @ a) * scale
    d = out_features // 3
    if groups == 2 and b.shape[0] == 2 * d and out_features == 3 * d:  # MergedLinear, enable_lora [Q, K, V] = [1, 0, 1]
        delta = torch.zeros(out_features, in_features)
        delta[:d] = b[:d] @ a[:rank]
        delta[2 * d:] = b[d:] @ a[rank:]
        return delta * scale
    raise UpscalerError(f"{what}: LoRA for {module} (B {tuple(b.shape)}) does not match its weight {tuple(weight_shape)}")
