"""RAM's visual encoder: timm's Swin (`swin_large_patch4_window12_384` for RAM Swin-L), shapes read from
the checkpoint, built without any download and without random initialisation.

RAM saves the original Swin layout: a stage's patch merging sits at its end (`layers.N.downsample`),
timm's at the start of the next stage (`layers.N+1.downsample`); buffers (`relative_position_index`,
`attn_mask`) are recomputed, not loaded. RAM's encoder output is the final norm over the last stage's
tokens with their mean prepended: (B, 1 + tokens, C).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ...runtime.errors import UpscalerError

PREFIX = "visual_encoder."
TIMM_NAME = "swin_large_patch4_window12_384"
SWIN_L_384 = dict(patch_size=4, embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), window_size=12)
_BUFFERS = ("relative_position_index", "attn_mask")
_DOWNSAMPLE = re.compile(r"^layers\.(\d+)\.downsample\.")
_BLOCK = re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.attn\.relative_position_bias_table$")


@dataclass(frozen=True)
class SwinShape:
    patch_size: int
    embed_dim: int
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    window_size: int
    mlp_ratio: float

    @property
    def image_size(self) -> int:
        """RAM's input side: the last stage is exactly one window (384 for Swin-L window 12)."""
        return self.window_size * self.patch_size * 2 ** (len(self.depths) - 1)

    @property
    def width(self) -> int:
        return self.embed_dim * 2 ** (len(self.depths) - 1)

    def is_swin_l_384(self) -> bool:
        return all(getattr(self, k) == v for k, v in SWIN_L_384.items()) and self.mlp_ratio == 4.0

    def describe(self) -> str:
        name = TIMM_NAME if self.is_swin_l_384() else "Swin"
        return (f"timm {name} (embed {self.embed_dim}, depths {list(self.depths)}, window {self.window_size}, "
                f"{self.image_size} px)")


def to_timm_key(key: str) -> str | None:
    """A RAM checkpoint key under visual_encoder. -> timm's name; None for what is not loaded."""
    key = key[len(PREFIX):]
    if key.endswith(_BUFFERS) or key.startswith("head."):  # buffers are recomputed; RAM has no classifier
        return None
    return _DOWNSAMPLE.sub(lambda m: f"layers.{int(m.group(1)) + 1}.downsample.", key)


def read_shape(weights: dict[str, torch.Tensor], what: str) -> SwinShape:
    """The Swin hyper-parameters from tensor shapes (timm-layout keys, no PREFIX)."""
    try:
        patch = weights["patch_embed.proj.weight"]
        tables = {}
        for key, value in weights.items():
            m = _BLOCK.match(key)
            if m:
                tables.setdefault(int(m.group(1)), []).append(value.shape)
        depths = tuple(len(tables[i]) for i in range(len(tables)))
        heads = tuple(tables[i][0][1] for i in range(len(tables)))
        window = int(round((tables[0][0][0] ** 0.5 + 1) / 2))
        mlp_ratio = weights["layers.0.blocks.0.mlp.fc1.weight"].shape[0] / patch.shape[0]
    except (KeyError, IndexError) as exc:
        raise UpscalerError(f"{what}: no Swin visual encoder under '{PREFIX}' (missing {exc}); use RAM's "
                            "ram_swin_large_14m.pth") from None
    if not depths or (2 * window - 1) ** 2 != tables[0][0][0]:
        raise UpscalerError(f"{what}: the Swin encoder's relative-position tables do not describe square windows")
    return SwinShape(patch.shape[2], patch.shape[0], depths, heads, window, mlp_ratio)


def build_swin(shape: SwinShape) -> torch.nn.Module:
    """timm's Swin with these shapes. On the meta device (no random init of 197M weights; `materialize`
    allocates it) when this timm can rebuild its index/mask buffers afterwards, else initialised on the CPU."""
    import timm
    from timm.models.swin_transformer import WindowAttention

    lazy = hasattr(WindowAttention, "init_non_persistent_buffers")  # recent timm 1.0.x
    return timm.create_model(
        TIMM_NAME, pretrained=False, num_classes=0, img_size=shape.image_size, patch_size=shape.patch_size,
        embed_dim=shape.embed_dim, depths=shape.depths, num_heads=shape.num_heads, window_size=shape.window_size,
        mlp_ratio=shape.mlp_ratio, drop_path_rate=0.0, **({"device": "meta"} if lazy else {}),
    )


def materialize(module: torch.nn.Module) -> None:
    """Allocate a meta module's tensors on the CPU (uninitialised: the checkpoint fills them) and recompute
    timm's index/mask buffers; a module already on the CPU is left alone."""
    if not any(p.is_meta for p in module.parameters()):
        return
    module.to_empty(device="cpu")
    for m in module.modules():
        if hasattr(m, "init_non_persistent_buffers"):
            m.init_non_persistent_buffers()


def encode(swin: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """RAM's image tokens: (B, 1 + h*w, C), the mean token first."""
    tokens = swin.forward_features(pixels).flatten(1, 2)  # timm: normed (B, h, w, C)
    return torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)
