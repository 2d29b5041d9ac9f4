"""Chain-of-Zoom's two LoRA files, read weights-only, checked against the model and merged at load.

- transformer (SR_LoRA/model_20001.pkl): a list of tensors, [up, down] per AdaLayerNormZero linear in
  module order (block0.norm1, block0.norm1_context, block1.norm1, ..., last block norm1); W += up @ down.
- VAE encoder (SR_VAE/vae_encoder_20001.pt): the encoder's full state dict in peft naming
  (<module>.base_layer.*, <module>.lora_A/B.<adapter>.weight); W = base + 2 * B @ A (convs: B's 1x1 times A).
The published scales (1.0 and 2.0) are fixed by the authors' training config and not stored in the files.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from ...assets.hashing import sha256_of
from ...runtime.errors import UpscalerError, error_text
from . import configs

LORA_FOLDER = "chain-of-zoom"  # models/loras/chain-of-zoom/ inside ComfyUI
TRANSFORMER_LORA = "model_20001.pkl"
VAE_ENCODER_LORA = "vae_encoder_20001.pt"
_PEFT = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])\.(?P<adapter>[^.]+)\.weight$")


def read_tensors(path: str | os.PathLike, what: str):
    """torch.load with weights_only=True (a .safetensors file is read directly): never runs pickled code."""
    path = Path(path)
    if not path.is_file():
        raise UpscalerError(f"{what} file not found: {path}. Put {TRANSFORMER_LORA} and {VAE_ENCODER_LORA} from the "
                            f"Chain-of-Zoom release in models/loras/{LORA_FOLDER}/")
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - the weights-only unpickler raises many types on bad files
        raise UpscalerError(
            f"{path.name} ({what}) was refused: it is not a plain weights file ({error_text(exc)}). Only tensors are loaded, never pickled code: use the original file "
            "from the Chain-of-Zoom release"
        ) from None


def adaln_targets(transformer: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
    """The .linear of every AdaLayerNormZero, in the order the authors' list stores them."""
    from diffusers.models.normalization import AdaLayerNormZero

    targets = []
    for i, block in enumerate(transformer.transformer_blocks):
        for attr in ("norm1", "norm1_context"):
            norm = getattr(block, attr, None)
            if isinstance(norm, AdaLayerNormZero):
                targets.append((f"transformer_blocks.{i}.{attr}.linear", norm.linear))
    return targets


def transformer_pairs(tensors, transformer: torch.nn.Module, name: str) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """[(module name, up, down)] after checking count and shapes against `transformer`."""
    targets = adaln_targets(transformer)
    expected = 2 * len(targets)
    if isinstance(tensors, tuple):
        tensors = list(tensors)
    if not isinstance(tensors, list) or not all(isinstance(t, torch.Tensor) for t in tensors):
        raise UpscalerError(f"{name}: expected the transformer LoRA as a list of {expected} tensors; got "
                            f"{type(tensors).__name__}: this is not Chain-of-Zoom's {TRANSFORMER_LORA}")
    if len(tensors) != expected:
        raise UpscalerError(
            f"{name}: expected {expected} tensors ({len(targets)} up/down pairs for the AdaLayerNormZero linears of "
            f"a {len(transformer.transformer_blocks)}-layer SD3 transformer); got {len(tensors)}. The LoRA does not "
            "match this base model: use SD3 medium with Chain-of-Zoom's model_20001.pkl"
        )
    pairs = []
    rank = tensors[1].shape[0] if tensors[1].ndim == 2 else None
    for k, (module, linear) in enumerate(targets):
        up, down = tensors[2 * k], tensors[2 * k + 1]
        want_up, want_down = (linear.out_features, rank), (rank, linear.in_features)
        for index, tensor, want, role in ((2 * k, up, want_up, "up"), (2 * k + 1, down, want_down, "down")):
            if tuple(tensor.shape) != want:
                raise UpscalerError(f"{name}: tensor {index} ({module} {role}) has shape {tuple(tensor.shape)}, "
                                    f"expected {want}: the LoRA does not match this base model")
        pairs.append((module, up, down))
    return pairs


def merge_transformer_lora(transformer: torch.nn.Module, path: str | os.PathLike) -> dict:
    """W += scale * up @ down on every AdaLayerNormZero linear; returns the receipt entry."""
    path = Path(path)
    pairs = transformer_pairs(read_tensors(path, "transformer LoRA"), transformer, path.name)
    modules = dict(transformer.named_modules())
    with torch.no_grad():
        for module, up, down in pairs:
            weight = modules[module].weight
            delta = configs.TRANSFORMER_LORA_SCALE * (up.float() @ down.float())
            weight.copy_((weight.float() + delta).to(weight.dtype))
    return {"file": path.name, "sha256": sha256_of(path), "part": "transformer LoRA", "targets": len(pairs),
            "rank": int(pairs[0][2].shape[0]) if pairs else 0, "scale": configs.TRANSFORMER_LORA_SCALE}


def split_peft(sd: dict, name: str) -> tuple[dict, dict]:
    """(base state dict in plain names, {module: (A, B)}) from a peft-named encoder state dict."""
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UpscalerError(f"{name}: expected the VAE encoder LoRA as a state dict of tensors; got {type(sd).__name__}")
    if sd and all(k.startswith("encoder.") for k in sd):
        sd = {k[len("encoder."):]: v for k, v in sd.items()}
    base, halves = {}, {}
    for key, value in sd.items():
        m = _PEFT.match(key)
        if m:
            halves.setdefault(m["module"], {})[m["ab"]] = value
        else:
            base[key.replace(".base_layer.", ".")] = value
    lora = {}
    for module, ab in halves.items():
        if set(ab) != {"A", "B"}:
            missing = ({"A", "B"} - set(ab)).pop()
            raise UpscalerError(f"{name}: {module}.lora_{missing} is missing (every wrapped module needs lora_A and lora_B)")
        lora[module] = (ab["A"], ab["B"])
    return base, lora


def _delta(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.float(), b.float()
    if a.ndim == 4:  # conv: A (r, in, k, k) with the base conv's stride/padding, B (out, r, 1, 1)
        return torch.einsum("or,rikl->oikl", b[:, :, 0, 0], a)
    return b @ a


def merge_vae_encoder_lora(vae: torch.nn.Module, path: str | os.PathLike) -> dict:
    """Replace the VAE encoder by the file's base tensors + scale * B @ A (merged); returns the receipt entry."""
    path = Path(path)
    base, lora = split_peft(read_tensors(path, "VAE encoder LoRA"), path.name)
    encoder = vae.encoder
    own = encoder.state_dict()
    missing = sorted(set(own) - set(base))
    if missing:
        raise UpscalerError(f"{path.name}: the VAE encoder LoRA lacks {len(missing)} base tensors, e.g. "
                            f"{missing[0]}.base_layer / {missing[0]}: not Chain-of-Zoom's {VAE_ENCODER_LORA} for SD3")
    unknown = sorted(set(base) - set(own))
    if unknown:
        raise UpscalerError(f"{path.name}: unexpected tensor {unknown[0]}: this file is not an SD3 VAE encoder LoRA")
    merged = {}
    for key, value in base.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise UpscalerError(f"{path.name}: {key} has shape {tuple(value.shape)}, expected {tuple(own[key].shape)}")
        merged[key] = value.float()
    for module, (a, b) in lora.items():
        key = f"{module}.weight"
        if key not in merged:
            raise UpscalerError(f"{path.name}: LoRA for {module}, which the SD3 VAE encoder does not have")
        delta = _delta(a, b)
        if tuple(delta.shape) != tuple(merged[key].shape):
            raise UpscalerError(f"{path.name}: {module} lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} make "
                                f"{tuple(delta.shape)}, expected {tuple(merged[key].shape)}")
        merged[key] = merged[key] + configs.VAE_LORA_SCALE * delta
    encoder.load_state_dict({k: v.to(own[k].dtype) for k, v in merged.items()}, strict=True)
    return {"file": path.name, "sha256": sha256_of(path), "part": "VAE encoder LoRA", "wrapped_modules": len(lora),
            "scale": configs.VAE_LORA_SCALE}
