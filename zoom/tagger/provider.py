"""The DAPE / RAM tag prompt provider (Chain-of-Zoom's published `dape` prompt type).

It follows zoom.prompts.PromptProvider: it ignores the instruction and tags the LAST image it is given
(the view being enlarged; in recursive_multiscale the context image comes first and is not tagged, as
in the reference). The text is the firing tags joined with ", " in tag-list order; the chain then makes
the published f"{tags}, {user prompt},". No sampling: the same image gives the same tags.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ...runtime.dtypes import select_dtype
from ...runtime.errors import UpscalerError
from ..prompts import join_tags
from .model import LoadInfo, RamTagger, load_ram
from .tags import TagOptions, Vocabulary, ram_vocabulary, select

log = logging.getLogger("dreamforge_upscale.tagger")
MEAN = (0.485, 0.456, 0.406)  # ImageNet normalisation, as RAM's transform
STD = (0.229, 0.224, 0.225)


def tagger_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: fp16 on CUDA (the reference's precision for DAPE), fp32 elsewhere."""
    return select_dtype(name, device, prefer="fp16")


def to_pixels(images: Sequence[Image.Image], size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """RAM's input: [0, 1] RGB, bilinear (antialiased) to size x size, ImageNet-normalised; (B, 3, size, size)."""
    out = []
    for im in images:
        x = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
        out.append(F.interpolate(x.to(device), size=(size, size), mode="bilinear", align_corners=False, antialias=True))
    x = torch.cat(out)
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1)
    return ((x - mean) / std).to(dtype)


@dataclasses.dataclass(frozen=True)
class TaggerProvider:
    """A loaded RAM (optionally DAPE-merged) and the tag options; immutable, shareable between graphs."""

    model: RamTagger
    vocabulary: Vocabulary
    options: TagOptions
    name: str  # what receipts quote: "dape:<ram file>+<dape file>" or "ram:<ram file>"
    info: LoadInfo

    @classmethod
    def load(cls, ram_path: str | Path, dape_path: str | Path | None = None, *, dtype: torch.dtype = torch.float32,
             max_tags: int = 0, drop_tags: str = "", keep_tags: str = "", threshold_offset: float = 0.0,
             vocabulary: Vocabulary | None = None) -> "TaggerProvider":
        vocabulary = vocabulary or ram_vocabulary()
        options = TagOptions.parse(vocabulary, max_tags=max_tags, drop_tags=drop_tags, keep_tags=keep_tags,
                                   threshold_offset=threshold_offset)  # before the slow part
        started = time.perf_counter()
        model, info = load_ram(ram_path, dape_path, len(vocabulary), dtype=dtype)
        name = f"dape:{info.ram}+{info.dape}" if info.dape else f"ram:{info.ram}"
        log.info("DreamForge tagger %s loaded in %.1f s: %s", name, time.perf_counter() - started, info.describe())
        return cls(model, vocabulary, options, name, info)

    def with_options(self, options: TagOptions) -> "TaggerProvider":
        return dataclasses.replace(self, options=options)

    def module(self) -> torch.nn.Module:
        return self.model

    def probabilities(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """sigmoid(logits) per image and tag, (B, tags) float32 on the CPU."""
        if not images:
            raise UpscalerError("the tagger needs at least one image")
        weight = self.model.fc.weight
        with torch.inference_mode():
            logits = self.model(to_pixels(images, self.model.image_size, weight.device, weight.dtype))
            return torch.sigmoid(logits).float().cpu()  # sigmoid in the model's dtype, like the reference

    def tags(self, images: Sequence[Image.Image]) -> list[list[str]]:
        return [[self.vocabulary.tags[i] for i in select(p, self.vocabulary, self.options)]
                for p in self.probabilities(images)]

    def describe(self, images, instruction=None, *, seed=None, check_interrupt=None, **generation) -> str:
        """The tags of the last image, ", "-joined in tag-list order ("" when none fires). The instruction,
        seed and generation settings (for language models) do not apply to a tagger."""
        if check_interrupt:
            check_interrupt()
        started = time.perf_counter()
        tags = self.tags(list(images)[-1:])[0]
        # one line per call: what the server log shows (and what the server test counts)
        log.info("DreamForge tagger %s: %d tags in %.2f s", self.name, len(tags), time.perf_counter() - started)
        return join_tags(tags)
