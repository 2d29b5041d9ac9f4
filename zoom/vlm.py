"""A vision-language prompt provider on transformers' image-text-to-text models (Qwen2.5-VL, Qwen2-VL).

Loads a local folder (config.json + weights + processor files) with local_files_only: nothing is
downloaded. Decoding is greedy at temperature 0 (deterministic); above 0 it samples with the call's
seed. The chat is the published one: instruction as the system message, the image(s) as the user turn.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image

from ..runtime.dtypes import select_dtype
from ..runtime.errors import UpscalerError
from .prompts import build_messages

DEFAULT_MAX_NEW_TOKENS = 32  # the published value of later versions (128 at first)


def is_model_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / "config.json").is_file()


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bf16 (fp16 where bf16 is missing) on CUDA, fp32 elsewhere."""
    return select_dtype(name, device, prefer="bf16")


@dataclass
class Description:
    """What one describe() call did: the rendered chat, the image count, the text."""

    text: str
    chat: str  # the chat text the processor rendered
    image_count: int
    image_grid: list  # per image the processor encoded: [t, h, w] patches
    new_tokens: int


class _Interrupt:
    """A stopping criterion that only polls the host's interrupt (which raises to stop)."""

    def __init__(self, check: Callable[[], None]):
        self.check = check

    def __call__(self, input_ids, scores, **kwargs):
        self.check()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class VLMPromptProvider:
    """An image-text-to-text model and its processor; generation defaults set at load time."""

    def __init__(self, model, processor, name: str, *, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 temperature: float = 0.0):
        check_generation(max_new_tokens, temperature)
        self.model = model.eval().requires_grad_(False)
        self.processor = processor
        self.name = name
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature

    @classmethod
    def load(cls, folder: str | os.PathLike, *, dtype: str | torch.dtype = "auto", device: torch.device | None = None,
             max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, temperature: float = 0.0) -> "VLMPromptProvider":
        from transformers import AutoModelForImageTextToText, AutoProcessor

        folder = Path(folder)
        if not is_model_folder(folder):
            raise UpscalerError(
                f"prompt model folder {folder} has no config.json: put a transformers vision-language model "
                "(e.g. Qwen2.5-VL-3B-Instruct, downloaded whole) in its own folder under models/LLM"
            )
        device = device or torch.device("cpu")
        torch_dtype = dtype if isinstance(dtype, torch.dtype) else pick_dtype(dtype, device)
        try:
            model = AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True, dtype=torch_dtype)
        except ValueError as exc:
            raise UpscalerError(
                f"{folder.name} is not an image-text-to-text (vision-language) model transformers can load "
                f"({str(exc)[:200]}); use one such as Qwen2.5-VL-3B-Instruct or Qwen2-VL-2B-Instruct"
            ) from None
        except OSError as exc:
            raise UpscalerError(
                f"{folder.name}: the weights could not be read ({str(exc)[:200]}); the folder is incomplete: "
                "copy the model's *.safetensors files next to its config.json"
            ) from None
        try:
            processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise UpscalerError(
                f"{folder.name}: the processor (tokenizer + image processor) could not be loaded "
                f"({str(exc)[:200]}); copy the model's tokenizer*, preprocessor_config.json and chat template files too"
            ) from None
        if getattr(processor, "chat_template", None) is None:
            raise UpscalerError(f"{folder.name} has no chat template: use the model's Instruct version")
        return cls(model.to(device), processor, f"vlm:{folder.name}", max_new_tokens=max_new_tokens,
                   temperature=temperature)

    def module(self) -> torch.nn.Module:
        return self.model

    def render(self, image_count: int, instruction: str) -> str:
        """The chat text the processor renders for the published messages."""
        return self.processor.apply_chat_template(build_messages(instruction, image_count), tokenize=False,
                                                  add_generation_prompt=True)

    def run(self, images: Sequence[Image.Image], instruction: str, *, seed: int | None = None,
            max_new_tokens: int | None = None, temperature: float | None = None,
            check_interrupt: Callable[[], None] | None = None) -> Description:
        images = [im.convert("RGB") for im in images]
        if not images:
            raise UpscalerError("Prompt-from-Image needs at least one image")
        max_new_tokens = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        temperature = self.temperature if temperature is None else temperature
        check_generation(max_new_tokens, temperature)
        chat = self.render(len(images), instruction)
        device = next(self.model.parameters()).device
        inputs = self.processor(text=[chat], images=images, padding=True, return_tensors="pt").to(device)
        floating = {k: v.to(self.model.dtype) for k, v in inputs.items() if torch.is_tensor(v) and v.is_floating_point()}
        inputs.update(floating)
        if temperature > 0:
            sampling = {"do_sample": True, "temperature": float(temperature)}
        else:
            sampling = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        extra = {}
        if check_interrupt is not None:
            from transformers import StoppingCriteriaList

            extra["stopping_criteria"] = StoppingCriteriaList([_Interrupt(check_interrupt)])
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.inference_mode():
            if seed is not None:
                torch.manual_seed(seed % 2**63)
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, **sampling, **extra)
        new = out[:, inputs["input_ids"].shape[1]:]
        text = self.processor.batch_decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False)[0]
        grid = inputs["image_grid_thw"].tolist() if "image_grid_thw" in inputs else []
        return Description(text=text, chat=chat, image_count=len(images), image_grid=grid, new_tokens=int(new.shape[1]))

    def describe(self, images, instruction, *, seed=None, check_interrupt=None, max_new_tokens=None,
                 temperature=None) -> str:
        return self.run(images, instruction, seed=seed, check_interrupt=check_interrupt,
                        max_new_tokens=max_new_tokens, temperature=temperature).text


def check_generation(max_new_tokens: int, temperature: float) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise UpscalerError(f"max_new_tokens must be 1 or more (published: 32; 128 in early versions); got {max_new_tokens!r}")
    if not (temperature >= 0) or temperature > 5:
        raise UpscalerError(f"temperature must be between 0 (greedy, deterministic) and 5; got {temperature!r}")
