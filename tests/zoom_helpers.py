"""Deterministic stand-ins for the Chain-of-Zoom tests: a 4x "model" that is PIL bicubic (optionally with
a colour cast, optionally taking prompts), and a prompt provider that records what it was shown.

Both implement the pack's real protocols (upscalers.contract.Upscaler, zoom.prompts.PromptProvider) and
run through the real code paths (upscale(), tiling, the zoom loop).
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from dreamforge_upscale.upscalers.contract import Capabilities, Conditioning, ModelSource, WindowResult


def pil_of(x_chw: torch.Tensor) -> Image.Image:
    arr = (x_chw.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(arr), "RGB")


class BicubicX4:
    """A 4x upscaler whose output is PIL's 8-bit BICUBIC enlargement, times per-channel `gains`."""

    offload = False

    def __init__(self, *, scale: int = 4, prompted: bool = False, gains=(1.0, 1.0, 1.0), context: int = 0):
        self.capabilities = Capabilities(
            impl="gan", native_scales=(scale,), dtypes=("fp32",), size_multiple=1, min_size=1, square=False,
            context=context, bytes_per_pixel=256.0, in_channels=3, out_channels=3, prompted=prompted,
        )
        self.source = ModelSource(f"bicubic-x{scale} (test)", None, "PIL bicubic")
        self.dtype = torch.float32
        self.gains = torch.tensor(gains, dtype=torch.float32).view(1, 3, 1, 1)
        self._module = torch.nn.Identity()
        self.calls: list[dict] = []

    @property
    def scale(self) -> int:
        return self.capabilities.native_scales[0]

    def module(self) -> torch.nn.Module:
        return self._module

    def describe(self) -> dict:
        return {**self.source.describe(), "impl": "test", "native_scale": self.scale, "dtype": "fp32"}

    def upscale_window(self, x: torch.Tensor, cond: Conditioning, hooks=None) -> WindowResult:
        self.calls.append({"shape": tuple(x.shape), "prompt": cond.prompt, "seed": cond.seed})
        s = self.scale
        outs = []
        for b in range(x.shape[0]):
            im = pil_of(x[b])
            big = im.resize((im.width * s, im.height * s), Image.Resampling.BICUBIC)
            outs.append(torch.from_numpy(np.asarray(big, dtype=np.float32) / 255.0).permute(2, 0, 1))
        return WindowResult((torch.stack(outs).to(x.device) * self.gains.to(x.device)).clamp(0, 1))


class RecordingProvider:
    """A prompt provider that returns 'view<N>' and keeps copies of every call's images and instruction."""

    name = "recording (test)"

    def __init__(self):
        self.calls: list[dict] = []

    def describe(self, images, instruction, *, seed=None, check_interrupt=None):
        self.calls.append({"images": [im.copy() for im in images], "instruction": instruction, "seed": seed})
        return f"view{len(self.calls)}"


def same_image(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB")))
