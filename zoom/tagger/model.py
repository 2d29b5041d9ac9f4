"""RAM (Recognize Anything, Swin-L) as a tagger, assembled from its checkpoint and, for DAPE, a LoRA file.

logits = fc(tagging_head(label_queries, image_proj(swin tokens))), one per tag. The label queries
ReLU(wordvec_proj(label_embed)) do not depend on the image: computed once here, stored as a buffer.
Only the weights these modules use are read from the checkpoint (the text encoder/decoder and whatever
training left in the file are never touched); float32 weights are not even copied: they stay views of the
memory-mapped file (private mapping: nothing is written back) until a cast or a move to the GPU copies
them. DAPE's LoRA is merged in float32 before any cast.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ...runtime.errors import UpscalerError
from .checkpoint import open_state_dict
from .head import TaggingHead, head_shape
from .lora import SUFFIXES, lora_delta, lora_pairs
from .swin import PREFIX as SWIN, SwinShape, build_swin, encode, materialize, read_shape, to_timm_key

HEAD = "tagging_head."
_HEAD_PARTS = ("crossattention.", "intermediate.", "output.")  # RAM deleted the head's self-attention
_TOP = ("image_proj.", "fc.")
_LABELS = ("label_embed", "wordvec_proj.weight", "wordvec_proj.bias")  # consumed at load


def model_key(key: str) -> str | None:
    """A checkpoint key -> the RamTagger / load-time name it feeds; None when it is not needed."""
    if key.startswith("vision_multi."):  # RAM's name for the tagging head
        key = HEAD + key[len("vision_multi."):]
    if key.startswith(SWIN):
        timm_key = to_timm_key(key)
        return SWIN + timm_key if timm_key else None
    if key.startswith(HEAD + "encoder.layer."):
        rest = key.split(".", 4)[-1]  # after tagging_head.encoder.layer.N.
        return key if rest.startswith(_HEAD_PARTS) else None
    return key if key.startswith(_TOP) or key in _LABELS else None


def _lora_target(key: str) -> bool:
    """A LoRA tensor that updates a weight this model uses."""
    for suffix in SUFFIXES:
        if key.endswith(suffix):
            return model_key(key[: -len(suffix)] + ".weight") is not None
    return False


class RamTagger(nn.Module):
    """Built on the meta device, then allocated uninitialised: the checkpoint fills every weight."""

    def __init__(self, swin_shape: SwinShape, head: dict, label_queries: torch.Tensor):
        super().__init__()
        self.image_size = swin_shape.image_size
        self.visual_encoder = build_swin(swin_shape)
        with torch.device("meta"):
            self.image_proj = nn.Linear(swin_shape.width, head["width"])
            self.tagging_head = TaggingHead(**head)
            self.fc = nn.Linear(head["hidden"], 1)
        for child in self.children():
            materialize(child)
        self.register_buffer("label_queries", label_queries, persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Logits (B, tags) for normalised (B, 3, image_size, image_size) pixels."""
        memory = self.image_proj(encode(self.visual_encoder, pixels))
        queries = self.label_queries.unsqueeze(0).expand(pixels.shape[0], -1, -1)
        return self.fc(self.tagging_head(queries, memory)).squeeze(-1)


@dataclass
class LoadInfo:
    ram: str
    dape: str | None = None
    lora_merged: list[str] = field(default_factory=list)  # module names, checkpoint layout
    dape_weights: list[str] = field(default_factory=list)  # base weights the DAPE file replaced
    swin: str = ""

    def describe(self) -> dict:
        return {"ram": self.ram, "dape": self.dape, "lora_merged": len(self.lora_merged),
                "dape_weights": len(self.dape_weights), "visual_encoder": self.swin}


def load_ram(ram_path: str | Path, dape_path: str | Path | None, tags: int, *,
             dtype: torch.dtype = torch.float32) -> tuple[RamTagger, LoadInfo]:
    """RamTagger on the CPU in `dtype` for a vocabulary of `tags` tags."""
    ram_path = Path(ram_path)
    info = LoadInfo(ram=ram_path.name, dape=Path(dape_path).name if dape_path else None)
    weights = _mapped(open_state_dict(ram_path, what="ram_model", keep=lambda k: model_key(k) is not None))
    pairs = _apply_dape_weights(weights, Path(dape_path), info) if dape_path is not None else {}
    shape = read_shape({k[len(SWIN):]: v for k, v in weights.items() if k.startswith(SWIN)}, "ram_model")
    info.swin = shape.describe()
    queries = _label_queries(weights, ram_path.name, tags)
    model = RamTagger(shape, head_shape(weights, HEAD), queries)
    _load_exact(model, weights, ram_path.name)
    _merge_loras(model, pairs)
    return model.to(dtype).eval().requires_grad_(False), info


def _label_queries(weights: dict[str, torch.Tensor], name: str, tags: int) -> torch.Tensor:
    """ReLU(wordvec_proj(label_embed)) in float32; consumes those three tensors."""
    needed = (*_LABELS, "image_proj.weight", "fc.weight", f"{HEAD}encoder.layer.0.crossattention.self.query.weight")
    missing = [k for k in needed if k not in weights]
    if missing:
        raise UpscalerError(f"ram_model: {name} is not a RAM checkpoint (no {', '.join(missing)}); use "
                            "ram_swin_large_14m.pth from recognize_anything_model")
    label_embed = weights.pop("label_embed").float()
    if label_embed.shape[0] != tags:
        extra = " (RAM++ files are not supported)" if label_embed.shape[0] % tags == 0 else ""
        raise UpscalerError(f"ram_model: {name} has {label_embed.shape[0]} label embeddings but the tag list "
                            f"has {tags}{extra}; use ram_swin_large_14m.pth (RAM, 4585 tags)")
    return F.relu(F.linear(label_embed, weights.pop("wordvec_proj.weight").float(), weights.pop("wordvec_proj.bias").float()))


def _mapped(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {model_key(k): v for k, v in weights.items()}


def _apply_dape_weights(weights: dict[str, torch.Tensor], dape_path: Path, info: LoadInfo) -> dict:
    """DAPE base weights (if the file has any) replace RAM's; returns its LoRA pairs for the merge."""
    dape = open_state_dict(dape_path, what="dape",
                           keep=lambda k: _lora_target(k) or (not k.endswith(SUFFIXES) and model_key(k) is not None))
    pairs = lora_pairs(dape, "dape")
    base = _mapped({k: v for k, v in dape.items() if not k.endswith(SUFFIXES)})
    if not pairs and not base:
        raise UpscalerError(f"dape: {dape_path.name} has no LoRA (lora_A / lora_B) for RAM's visual encoder or "
                            "tagging head; use DAPE.pth from Chain-of-Zoom's ckpt/DAPE (or choose 'none')")
    for key, value in base.items():
        if key in weights and value.shape != weights[key].shape:
            raise UpscalerError(f"dape: {key} has shape {tuple(value.shape)}, RAM's {tuple(weights[key].shape)}; "
                                "the DAPE file does not belong to this RAM model")
    weights.update(base)
    info.dape_weights = sorted(base)
    info.lora_merged = sorted(pairs)
    return pairs


def _load_exact(model: RamTagger, weights: dict[str, torch.Tensor], name: str) -> None:
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in weights]
    if missing:
        raise UpscalerError(f"ram_model: {name} lacks {len(missing)} weights RAM Swin needs (e.g. {', '.join(missing[:3])}); "
                            "the file is not RAM's ram_swin_large_14m.pth or is damaged")
    for key, shape in expected.items():
        if weights[key].shape != shape:
            raise UpscalerError(f"ram_model: {key} has shape {tuple(weights[key].shape)}, expected {tuple(shape)}")
    # assign, not copy: a float32 tensor stays a view of the memory-mapped file (its pages are read once, into
    # the page cache, and only these ~0.85 GB of the 5.6 GB file); the LoRA merge copies-on-write what it changes
    model.load_state_dict({k: weights[k].float() for k in expected}, strict=True, assign=True)


@torch.no_grad()
def _merge_loras(model: RamTagger, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """After the (float32) base weights are in place: W += delta for every LoRA pair."""
    params = dict(model.named_parameters())
    for module, (a, b) in pairs.items():
        weight = params[model_key(module + ".weight")]
        weight += lora_delta(weight.shape, a, b, module, "dape").to(weight.dtype)
