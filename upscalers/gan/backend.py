"""GAN / feed-forward SR backend: any single-image model spandrel loads (ESRGAN, Compact, SwinIR, HAT, DAT...)."""
from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from spandrel import (
    MAIN_REGISTRY, Architecture, ArchSupport, ImageModelDescriptor, ModelLoader, ModelTiling, UnsupportedModelError,
    canonicalize_state_dict,
)

from ...assets.hashing import sha256_of
from ...assets.provenance import receipt_provenance
from ...runtime.devices import default_device
from ...runtime.dtypes import dtype_name, select_dtype
from ...runtime.errors import UpscalerError, error_text
from ...tiling import RunHooks
from ..contract import Capabilities, Conditioning, Impl, ModelSource, WindowResult
from ..loading import read_weights
from ..sdx4.detect import SD_X4_MESSAGE, is_sdx4_file, is_sdx4_state_dict
from .nearest_upconv import rewrite_checked

# Input pixels of real context a tile needs for its centre to match an untiled pass, per spandrel
# architecture id. Measured on real weights where we have them (tests/test_gan.py re-measures
# Compact; x4plus is checked against 3/255); the rest follow their receptive fields / windows.
CONTEXT_BY_ARCH = {
    "Compact": 32,  # exact at 32
    "ESRGAN": 64,  # 48 px -> 4/255, 64 px -> 1.3/255
    "SPAN": 32,
    "RealCUGAN": 48,
    "PLKSR": 48,
}
DEFAULT_CONTEXT = 64  # transformers (SwinIR, HAT, DAT, ...) and anything unknown
COMPILE_ENV = "DREAMFORGE_TORCH_COMPILE"  # "1": torch.compile GAN models loaded for a CUDA device



def _bytes_per_pixel(descriptor: ImageModelDescriptor) -> float:
    """Working memory per input pixel (fp32), from a shape-only trace on the meta device.

    Peak memory is dominated by the largest activations alive at once; three times the largest
    module output is a conservative rule that holds for residual/dense conv nets and SR heads.
    """
    req = descriptor.size_requirements
    side = max(64, req.minimum)
    side = -(-side // req.multiple_of) * req.multiple_of
    largest = 0

    def hook(_module, _inputs, output):
        nonlocal largest
        if isinstance(output, torch.Tensor):
            largest = max(largest, output.numel())

    model = descriptor.model
    try:
        meta = _meta_copy(model)
        handles = [m.register_forward_hook(hook) for m in meta.modules()]
        with torch.no_grad():
            meta(torch.empty(1, descriptor.input_channels, side, side, device="meta"))
        for h in handles:
            h.remove()
    except Exception:  # noqa: BLE001 - some architectures cannot run on meta: use core's rule of thumb
        return 4.0 * 384 * 3 * max(1, descriptor.scale)
    return 3.0 * 4.0 * largest / (side * side)


class _SDX4Refusal(Architecture):
    """Recognises the SD x4 upscaler checkpoint in any spandrel-based loader (ComfyUI's 'Load Upscale
    Model' included) and refuses it with a message saying what to do, instead of 'unsupported model'."""

    def __init__(self):
        super().__init__(id="DreamForgeSDX4Upscaler", name="Stable Diffusion x4 upscaler",
                         detect=is_sdx4_state_dict)

    def load(self, state_dict):
        raise UpscalerError(f"this file is the {SD_X4_MESSAGE}")


def register_sd_x4_refusal() -> None:
    """Add the refusal to spandrel's main registry once (it is checked before the real architectures)."""
    if all(s.architecture.id != "DreamForgeSDX4Upscaler" for s in MAIN_REGISTRY.architectures()):
        MAIN_REGISTRY.add(ArchSupport.from_architecture(_SDX4Refusal()))


def _meta_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The module's structure with shape-only (meta) tensors: the weights themselves are never copied."""
    memo = {id(t): torch.nn.Parameter(torch.empty_like(t, device="meta"), requires_grad=False)
            for t in model.parameters()}
    memo.update({id(t): torch.empty_like(t, device="meta") for t in model.buffers()})
    return copy.deepcopy(model, memo).eval()


def capabilities_of(descriptor: ImageModelDescriptor) -> Capabilities:
    req = descriptor.size_requirements
    dtypes = ["fp32"]
    if descriptor.supports_half:
        dtypes.append("fp16")
    if descriptor.supports_bfloat16:
        dtypes.append("bf16")
    return Capabilities(
        impl=Impl.GAN,
        native_scales=(descriptor.scale,),
        dtypes=tuple(dtypes),
        size_multiple=req.multiple_of,
        min_size=req.minimum,
        square=req.square,
        context=CONTEXT_BY_ARCH.get(descriptor.architecture.id, DEFAULT_CONTEXT),
        # spandrel's INTERNAL: the model tiles itself, so outer tiles would only add seams
        whole_image=descriptor.tiling == ModelTiling.INTERNAL,
        tiling_hint="discouraged" if descriptor.tiling == ModelTiling.DISCOURAGED else "supported",
        bytes_per_pixel=_bytes_per_pixel(descriptor),
        in_channels=descriptor.input_channels,
        out_channels=descriptor.output_channels,
    )


def _probe(descriptor: ImageModelDescriptor) -> torch.Tensor:
    """A small random input the model accepts (its size requirements), on its device, channels_last."""
    req = descriptor.size_requirements
    side = -(-max(16, req.minimum) // req.multiple_of) * req.multiple_of
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(1, descriptor.input_channels, side, side, generator=generator)
    weight = next(descriptor.model.parameters(), None)
    if weight is None:
        return x
    return x.to(weight.device, weight.dtype).contiguous(memory_format=torch.channels_last)


class GANUpscaler:
    """A spandrel model with its load-time dtype; per-call state is passed to `upscale_window`."""

    offload = False  # one network: the host loads it whole

    def __init__(self, descriptor: ImageModelDescriptor, source: ModelSource, dtype: torch.dtype, owned: bool = True,
                 compile: bool = False):
        if not isinstance(descriptor, ImageModelDescriptor):
            raise UpscalerError(
                f"{source.file} is a {type(descriptor).__name__} ({descriptor.architecture.name}, e.g. inpainting): "
                "an upscaler must be a single-image model"
            )
        self.descriptor = descriptor
        self.source = source
        self.dtype = dtype
        self.capabilities = capabilities_of(descriptor)
        self.rewritten_upconvs = 0
        if owned:  # a model someone else loaded (ComfyUI's loader) is used as it is, never changed
            descriptor.model.eval().requires_grad_(False)
            # Weights stay as loaded (fp32) and fp16/bf16 run under autocast: the same module can then
            # also be handed to ComfyUI's own upscale node, which feeds it fp32 images.
            # channels_last: 1.1-1.4x faster convolutions on CPU and tensor cores, same results.
            descriptor.model.to(memory_format=torch.channels_last)
            # ESRGAN-family heads: nearest upsample + conv run on the low-resolution map (2.25x fewer
            # multiply-adds there, same output; kept only if a probe reproduces the original).
            self.rewritten_upconvs = rewrite_checked(descriptor.model, _probe(descriptor))
        # Optional torch.compile (fixed at construction; graphs are cached per window shape, so it pays on
        # a GPU running many equal tiles, not for one untiled CPU pass, hence off by default).
        self._compiled = torch.compile(descriptor.model, dynamic=False) if compile else None

    @property
    def scale(self) -> int:
        return self.descriptor.scale

    def module(self) -> torch.nn.Module:
        return self.descriptor.model

    def upscale_window(self, x: torch.Tensor, cond: Conditioning | None = None,
                       hooks: RunHooks | None = None) -> WindowResult:
        """The contract's call; a GAN takes no prompt, seed or options."""
        return WindowResult(self.forward(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """B,C,h,w -> B,C,h*s,w*s in the load-time dtype (fp16/bf16 under autocast)."""
        reduced = self.dtype != next(self.descriptor.model.parameters()).dtype
        with torch.inference_mode(), torch.autocast(x.device.type, dtype=self.dtype, enabled=reduced):
            return self._compiled(x) if self._compiled is not None else self.descriptor(x)

    @classmethod
    def from_descriptor(cls, descriptor, label: str = "UPSCALE_MODEL (ComfyUI loader)") -> "GANUpscaler":
        """Wrap a model someone else loaded (ComfyUI's UpscaleModelLoader) in its current dtype."""
        dtype = next(descriptor.model.parameters()).dtype
        return cls(descriptor, ModelSource(label, None, descriptor.architecture.name), dtype, owned=False)

    @classmethod
    def load(cls, path: str | os.PathLike, dtype: str = "auto", device: torch.device | None = None,
             compile: bool | None = None) -> "GANUpscaler":
        """Load a GAN checkpoint safely; `dtype` is one of auto/fp32/fp16/bf16 for `device`.

        `compile`: wrap the network in torch.compile; None = DREAMFORGE_TORCH_COMPILE=1 on a CUDA device."""
        path = Path(path)
        if is_sdx4_file(path):  # from the header: the multi-GB file is not read
            raise UpscalerError(f"{path.name} is the {SD_X4_MESSAGE}")
        sd = canonicalize_state_dict(read_weights(path))  # unwraps params_ema / state_dict / module.
        if is_sdx4_state_dict(sd):
            raise UpscalerError(f"{path.name} is the {SD_X4_MESSAGE}")
        try:
            descriptor = ModelLoader().load_from_state_dict(sd)
        except UnsupportedModelError:
            keys = ", ".join(list(sd)[:3])
            raise UpscalerError(
                f"{path.name} is not a model architecture spandrel recognises (first keys: {keys}). "
                "Pick a single-image super-resolution model (ESRGAN, Real-ESRGAN, Compact, SwinIR, HAT, DAT, ...)."
            ) from None
        except Exception as exc:  # noqa: BLE001 - a recognised architecture with inconsistent tensors
            raise UpscalerError(
                f"{path.name} looks like a known architecture but its weights do not fit it "
                f"({error_text(exc)}); the file is damaged or incomplete: re-download it."
            ) from None
        device = device or default_device()
        chosen = select_dtype(dtype, device, descriptor.supports_half, descriptor.supports_bfloat16)
        sha = sha256_of(path)
        source = ModelSource(path.name, sha, descriptor.architecture.name, receipt_provenance(path, sha))
        if compile is None:
            compile = device.type == "cuda" and os.environ.get(COMPILE_ENV, "0") == "1"
        return cls(descriptor, source, chosen, compile=compile)

    def describe(self) -> dict:
        return {**self.source.describe(), "impl": Impl.GAN, "native_scale": self.scale, "dtype": dtype_name(self.dtype)}
