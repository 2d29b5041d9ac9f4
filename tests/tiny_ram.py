"""Tiny random Recognize-Anything (RAM) and DAPE checkpoints in the published layouts, built offline.

`ram_swin_large_14m.pth` layout: {"model": state dict, "optimizer": ..., "config": ..., "epoch": ...};
the state dict holds the Swin under `visual_encoder.` in the ORIGINAL Swin layout (patch merging at the
end of a stage, relative_position_index / attn_mask buffers saved, a classifier head), the tagging
head under `vision_multi.` with the BERT parts RAM does not use (embeddings, the deleted
self-attention), `label_embed`, `wordvec_proj`, `image_proj`, `fc`, plus unused text encoder /
decoder weights. `DAPE.pth`: a flat dict of loralib LoRA tensors only (Swin qkv: MergedLinear r=8 on
Q and V; the head's query and key: Linear r=8; and unused tag_encoder LoRA), as SeeSR saves it.

The Swin is timm's with small dims (2 stages, window 4, 32 px input) and random weights; the head is
written here key by key from the published names, not from the pack's modules.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

TAGS = 4585  # the real vocabulary size: the pack's tag list is used as is
SWIN = dict(patch_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4)
IMAGE_SIZE = 32  # window 4 x patch 4 x 2 (the last stage is one window)
SWIN_WIDTH = 32  # embed_dim * 2
WIDTH = 16  # image_proj output = label_embed width (512 in RAM)
HIDDEN = 32  # head hidden (768 in RAM); 4 heads of 8
INNER = 64  # head FFN (3072 in RAM)
LAYERS = 2
RANK = 8
WORDVEC_STD = 5.0


def tiny_swin(seed: int = 0) -> torch.nn.Module:
    """timm's Swin with the tiny dims and random weights (every tensor, so nothing is a trivial 0 or 1)."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model("swin_large_patch4_window12_384", pretrained=False, num_classes=0,
                              img_size=IMAGE_SIZE, **SWIN).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "norm1.weight", "norm2.weight")):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    return model


def to_original_swin(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """timm's state dict (with its buffers) in the original Swin key layout RAM saves."""
    out = {}
    for key, value in {**model.state_dict(), **dict(model.named_buffers())}.items():
        key = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", key)
        out[key] = value.clone()
    out["head.weight"] = torch.randn(1000, SWIN_WIDTH)  # the original Swin keeps its ImageNet classifier
    out["head.bias"] = torch.zeros(1000)
    return out


def head_state_dict(gen: torch.Generator, *, fc_bias: float, fc_scale: float) -> dict[str, torch.Tensor]:
    """RAM's tagging head as saved under vision_multi., plus the unused BERT parts."""
    def rnd(*shape, std=0.3):
        return torch.randn(*shape, generator=gen) * std

    sd = {"embeddings.word_embeddings.weight": rnd(30, HIDDEN), "embeddings.LayerNorm.weight": torch.ones(HIDDEN)}
    for i in range(LAYERS):
        p = f"encoder.layer.{i}."
        for name, fan_in in (("query", HIDDEN), ("key", WIDTH), ("value", WIDTH)):
            sd[p + f"crossattention.self.{name}.weight"] = rnd(HIDDEN, fan_in)
            sd[p + f"crossattention.self.{name}.bias"] = rnd(HIDDEN, std=0.1)
            sd[p + f"attention.self.{name}.weight"] = rnd(HIDDEN, HIDDEN)  # self-attention RAM deleted
        for name, (out, inp) in (("crossattention.output.dense", (HIDDEN, HIDDEN)), ("intermediate.dense", (INNER, HIDDEN)),
                                 ("output.dense", (HIDDEN, INNER))):
            sd[p + name + ".weight"] = rnd(out, inp)
            sd[p + name + ".bias"] = rnd(out, std=0.1)
        for name in ("crossattention.output.LayerNorm", "output.LayerNorm"):
            sd[p + name + ".weight"] = 1 + rnd(HIDDEN, std=0.1)
            sd[p + name + ".bias"] = rnd(HIDDEN, std=0.1)
    return {"vision_multi." + k: v for k, v in sd.items()} | {
        "fc.weight": rnd(1, HIDDEN, std=fc_scale), "fc.bias": torch.tensor([fc_bias]),
    }


def ram_state_dict(seed: int = 0, *, tags: int = TAGS, image_weight: float = 1.0, fc_bias: float = -12.0,
                   fc_scale: float = 1.5) -> dict[str, torch.Tensor]:
    """image_weight 0 makes the tags independent of the image (image_proj ignores the Swin tokens)."""
    gen = torch.Generator().manual_seed(seed + 1)
    sd = {"visual_encoder." + k: v for k, v in to_original_swin(tiny_swin(seed)).items()}
    sd |= head_state_dict(gen, fc_bias=fc_bias, fc_scale=fc_scale)
    sd |= {
        "image_proj.weight": torch.randn(WIDTH, SWIN_WIDTH, generator=gen) * 0.3 * image_weight,
        "image_proj.bias": torch.randn(WIDTH, generator=gen) * 0.3,
        "label_embed": torch.randn(tags, WIDTH, generator=gen),
        "wordvec_proj.weight": torch.randn(HIDDEN, WIDTH, generator=gen) * WORDVEC_STD,
        "wordvec_proj.bias": torch.randn(HIDDEN, generator=gen) * 0.1,
        "tag_encoder.encoder.layer.0.attention.self.query.weight": torch.randn(HIDDEN, HIDDEN, generator=gen),
        "text_decoder.bert.embeddings.word_embeddings.weight": torch.randn(40, HIDDEN, generator=gen),
    }
    return sd


def dape_state_dict(ram: dict[str, torch.Tensor], seed: int = 1, std: float = 0.5) -> dict[str, torch.Tensor]:
    """LoRA for every Swin qkv (Q and V) and the head's query/key, plus unused tag_encoder LoRA."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for key, w in ram.items():
        if re.fullmatch(r"visual_encoder\.layers\.\d+\.blocks\.\d+\.attn\.qkv\.weight", key):
            dim = w.shape[1]
            sd[key[:-6] + "lora_A"] = torch.randn(2 * RANK, dim, generator=gen) * std
            sd[key[:-6] + "lora_B"] = torch.randn(2 * dim, RANK, generator=gen) * std
        elif re.fullmatch(r"vision_multi\.encoder\.layer\.\d+\.crossattention\.self\.(query|key)\.weight", key):
            name = "tagging_head." + key[len("vision_multi."):-6]
            sd[name + "lora_A"] = torch.randn(RANK, w.shape[1], generator=gen) * std
            sd[name + "lora_B"] = torch.randn(w.shape[0], RANK, generator=gen) * std
    sd["tag_encoder.encoder.layer.0.crossattention.self.query.lora_A"] = torch.randn(RANK, HIDDEN, generator=gen)
    sd["tag_encoder.encoder.layer.0.crossattention.self.query.lora_B"] = torch.randn(HIDDEN, RANK, generator=gen)
    return sd


def save_tiny_ram(path: str | Path, seed: int = 0, **kwargs) -> Path:
    """The RAM checkpoint as training saved it (weights under "model", plus optimizer state and config)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = ram_state_dict(seed, **kwargs)
    torch.save({"model": sd, "optimizer": {"state": {0: {"exp_avg": torch.zeros(64)}}, "param_groups": [{"lr": 1e-4}]},
                "config": {"image_size": IMAGE_SIZE, "vit": "swin_l"}, "epoch": 4}, path)
    return path


def save_tiny_dape(path: str | Path, ram_path: str | Path, seed: int = 1) -> Path:
    path = Path(path)
    ram = torch.load(ram_path, weights_only=True)["model"]
    torch.save(dape_state_dict(ram, seed), path)
    return path
