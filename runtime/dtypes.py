"""Choosing the compute dtype for a model on a device."""
from __future__ import annotations

import torch

from .errors import UpscalerError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = tuple(DTYPES)


def itemsize(dtype: torch.dtype) -> int:
    """Bytes per element of a floating-point dtype."""
    return torch.finfo(dtype).bits // 8


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def cpu_bf16_accelerated() -> bool:
    """AVX512-BF16/AMX: without them bf16 on the CPU is emulated and slower than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def select_dtype(requested: str, device: torch.device, supports_half: bool = True, supports_bf16: bool = True,
                 prefer: str = "fp16") -> torch.dtype:
    """The pack's one dtype picker. auto: on CUDA the `prefer`red half type (fp16 or bf16) where the network
    allows it and the GPU has it, else the other half type, else fp32; fp32 on the CPU. An explicit choice
    the network or device cannot run is an error, not a silent switch."""
    if requested == "auto":
        if device.type == "cuda":
            half_ok = {"fp16": supports_half, "bf16": supports_bf16 and torch.cuda.is_bf16_supported()}
            for name in (prefer, "bf16" if prefer == "fp16" else "fp16"):
                if half_ok[name]:
                    return DTYPES[name]
        return torch.float32
    if requested not in DTYPES:
        raise UpscalerError(f"dtype must be one of auto, {', '.join(DTYPE_NAMES)}; got {requested!r}")
    if requested == "fp16" and not supports_half:
        raise UpscalerError("dtype fp16: this network produces wrong results in fp16; choose bf16, fp32 or auto")
    if requested == "fp16" and device.type == "cpu":
        raise UpscalerError("dtype fp16 is not supported on the CPU; choose bf16 or fp32 (or auto)")
    if requested == "bf16" and not supports_bf16:
        raise UpscalerError("dtype bf16: this network does not support bfloat16; choose fp32 or auto")
    return DTYPES[requested]


def vae_dtype_for(main: torch.dtype, device: torch.device) -> torch.dtype:
    """A VAE beside a network in `main`: bf16 beside a half-precision network where the device has it, else
    fp32 (VAE decoders overflow in fp16, so never that)."""
    if main == torch.float32:
        return torch.float32
    if main == torch.bfloat16 or (device.type == "cuda" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float32
