"""RAM's tag vocabulary (4585 tags, a threshold each) and the rule that turns probabilities into tags.

The data files are the Recognize Anything project's (Apache-2.0, data/NOTICE). A tag fires when its
probability is strictly above its own threshold; tags whose threshold is 1.0 or more never fire (the
upstream list switches ten tags off that way, and a threshold offset keeps them off).
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from ...runtime.errors import UpscalerError

DATA_DIR = Path(__file__).resolve().parent / "data"
TAG_LIST = DATA_DIR / "ram_tag_list.txt"
THRESHOLDS = DATA_DIR / "ram_tag_list_threshold.txt"
DISABLED = 1.0  # a threshold at or above this switches a tag off


@dataclass(frozen=True)
class Vocabulary:
    tags: tuple[str, ...]
    thresholds: torch.Tensor  # float32 (len(tags),)

    def __post_init__(self):
        if self.thresholds.shape != (len(self.tags),):
            raise ValueError(f"{len(self.tags)} tags but thresholds of shape {tuple(self.thresholds.shape)}")

    def __len__(self) -> int:
        return len(self.tags)

    def resolve(self, names: str, what: str) -> tuple[int, ...]:
        """Indices of comma- or newline-separated tag names (case-insensitive), for the input called `what`."""
        lookup = _lookup(self.tags)
        found, unknown = [], []
        for name in (n.strip() for n in re.split(r"[,\n]", names or "")):
            if not name:
                continue
            index = lookup.get(name.casefold())
            (unknown.append(name) if index is None else found.append(index))
        if unknown:
            hints = []
            for name in unknown[:3]:
                close = difflib.get_close_matches(name.casefold(), list(lookup), n=3, cutoff=0.75)
                hints.append(f"{name!r}" + (f" (did you mean {', '.join(self.tags[lookup[c]] for c in close)}?)"
                                            if close else ""))
            raise UpscalerError(
                f"{what}: {', '.join(hints)} not in RAM's tag list ({len(self.tags)} tags, "
                f"zoom/tagger/data/{TAG_LIST.name}); use tags from that list, separated by commas"
            )
        return tuple(sorted(set(found)))


@lru_cache(maxsize=4)
def _lookup(tags: tuple[str, ...]) -> dict[str, int]:
    return {t.casefold(): i for i, t in enumerate(tags)}


@lru_cache(maxsize=1)
def ram_vocabulary() -> Vocabulary:
    tags = tuple(line.strip() for line in TAG_LIST.read_text(encoding="utf-8").splitlines() if line.strip())
    values = [float(line) for line in THRESHOLDS.read_text(encoding="utf-8").splitlines() if line.strip()]
    return Vocabulary(tags, torch.tensor(values, dtype=torch.float32))


@dataclass(frozen=True)
class TagOptions:
    """What a user can change about which tags make the prompt (validated against a vocabulary)."""

    max_tags: int = 0  # 0 = every firing tag; else the most probable ones (still listed in tag-list order)
    drop: tuple[int, ...] = ()  # never in the prompt
    keep: tuple[int, ...] = ()  # always in the prompt
    threshold_offset: float = 0.0  # added to every threshold (negative: more tags)

    @classmethod
    def parse(cls, vocabulary: Vocabulary, *, max_tags: int = 0, drop_tags: str = "", keep_tags: str = "",
              threshold_offset: float = 0.0) -> "TagOptions":
        if not isinstance(max_tags, int) or max_tags < 0:
            raise UpscalerError(f"max_tags must be 0 (no limit) or more; got {max_tags!r}")
        if not -1.0 <= threshold_offset <= 1.0:
            raise UpscalerError(f"threshold_offset must be between -1 and 1 (added to each tag's own threshold); "
                                f"got {threshold_offset!r}")
        drop = vocabulary.resolve(drop_tags, "drop_tags")
        keep = vocabulary.resolve(keep_tags, "keep_tags")
        both = sorted(set(drop) & set(keep))
        if both:
            raise UpscalerError(f"{', '.join(vocabulary.tags[i] for i in both)} is in both drop_tags and keep_tags; "
                                "remove it from one of them")
        return cls(max_tags, drop, keep, float(threshold_offset))


def select(probabilities: torch.Tensor, vocabulary: Vocabulary, options: TagOptions = TagOptions()) -> list[int]:
    """Indices (ascending = tag-list order) of the tags one image's probabilities (C,) make."""
    probs = probabilities.float().cpu()
    thresholds = vocabulary.thresholds
    fire = (probs > thresholds + options.threshold_offset) & (thresholds < DISABLED)
    fire[list(options.drop)] = False
    if options.max_tags and int(fire.sum()) > options.max_tags:
        candidates = fire.nonzero().squeeze(1)
        # most probable first; equal probabilities keep tag-list order (stable sort)
        order = torch.sort(probs[candidates], descending=True, stable=True).indices
        fire = torch.zeros_like(fire)
        fire[candidates[order[:options.max_tags]]] = True
    fire[list(options.keep)] = True
    return fire.nonzero().squeeze(1).tolist()
