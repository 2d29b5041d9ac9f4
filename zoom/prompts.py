"""Prompt providers: what describes a scale-state so the SR model knows what it is enlarging.

A provider turns one image (a view) or two (a context and a zoom-in of it) into text. The published
instructions are the VLM's system message; the user turn holds only the image(s). Providers:

- `NullProvider`: no model; the prompt is the user's text alone (the published `null`).
- `zoom.vlm.VLMPromptProvider`: a transformers image-text-to-text model (Qwen2.5-VL, Qwen2-VL).
- `zoom.tagger.TaggerProvider`: Recognize-Anything / DAPE tags (the published `dape`, the reference's
  default). It ignores the instruction, tags only the last image (the view being enlarged, also in
  recursive_multiscale) and joins the firing tags with ", " in tag-list order (`join_tags`).

The final prompt is the published f"{generated}, {user_prompt}," (the generated text alone when the
user prompt is empty, as the reference code does). A tagger with no tag firing generates "": the
prompt is then "" or ", {user_prompt},", exactly as the reference formats it.
"""
from __future__ import annotations

from typing import Callable, Protocol, Sequence, runtime_checkable

from PIL import Image

SINGLE_IMAGE_INSTRUCTION = "What is in this image? Give me a set of words."
TWO_IMAGE_INSTRUCTION = ("The second image is a zoom-in of the first image. Based on this knowledge, what is in "
                         "the second image? Give me a set of words.")


def instruction_for(image_count: int) -> str:
    if image_count == 1:
        return SINGLE_IMAGE_INSTRUCTION
    if image_count == 2:
        return TWO_IMAGE_INSTRUCTION
    raise ValueError(f"a prompt is made from 1 image (a view) or 2 (context, then its zoom-in); got {image_count}")


TAG_SEPARATOR = ", "  # the published dape format (RAM's own generate_tag joins with " | ")


def join_tags(tags: Sequence[str]) -> str:
    """A tagger's text: its tags (already in tag-list order) joined with ", "; "" for none."""
    return TAG_SEPARATOR.join(tags)


def build_messages(instruction: str, image_count: int) -> list[dict]:
    """The published chat: the instruction as the system message, the user turn only the image(s)."""
    return [
        {"role": "system", "content": instruction},
        {"role": "user", "content": [{"type": "image"} for _ in range(image_count)]},
    ]


def compose_prompt(generated: str | None, user_prompt: str) -> str:
    """Published: f"{generated}, {user_prompt}," when there is a user prompt, else the generated text;
    no generated text (null provider): the user prompt alone."""
    user_prompt = user_prompt or ""
    if generated is None:
        return user_prompt
    return f"{generated}, {user_prompt}," if user_prompt else generated


@runtime_checkable
class PromptProvider(Protocol):
    """Describes images. Load-time settings live on the object; a call's seed and interrupt are passed in."""

    name: str  # what a receipt quotes, e.g. "null" or "vlm:Qwen2.5-VL-3B-Instruct"

    def describe(self, images: Sequence[Image.Image], instruction: str, *, seed: int | None = None,
                 check_interrupt: Callable[[], None] | None = None) -> str | None:
        """Text for `images` (1: a view; 2: context, then its zoom-in) following `instruction`;
        None when the provider generates nothing (the user prompt is used alone)."""


class NullProvider:
    """The published `null` prompt: no model, the user prompt only."""

    name = "null"

    def describe(self, images, instruction, *, seed=None, check_interrupt=None):
        return None


NULL_PROVIDER = NullProvider()


def make_prompt(provider: PromptProvider | None, images: Sequence[Image.Image], user_prompt: str, *,
                seed: int | None = None, check_interrupt: Callable[[], None] | None = None) -> tuple[str, str | None]:
    """(final prompt, generated text or None) for `images` with the published instruction for their count."""
    provider = provider or NULL_PROVIDER
    generated = provider.describe(list(images), instruction_for(len(images)), seed=seed,
                                  check_interrupt=check_interrupt)
    return compose_prompt(generated, user_prompt), generated
