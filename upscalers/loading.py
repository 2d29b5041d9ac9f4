"""Safe reading of model files: weights only, never pickled code; clear errors for wrong files."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..assets.hashing import WEIGHT_EXTENSIONS
from ..runtime.errors import UpscalerError, error_text


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a checkpoint's tensors on the CPU. .safetensors directly; pickles with weights_only."""
    path = Path(path)
    if not path.is_file():
        raise UpscalerError(f"model file not found: {path}. Put the file in ComfyUI's models/upscale_models folder.")
    ext = path.suffix.lower()
    if ext not in WEIGHT_EXTENSIONS:
        raise UpscalerError(f"{path.name}: unsupported model file type {ext!r}; expected one of {', '.join(WEIGHT_EXTENSIONS)}")
    if path.stat().st_size == 0:
        raise UpscalerError(f"{path.name} is empty (0 bytes): a download or copy did not finish. Re-download the file "
                            "or copy it again, then refresh.")
    try:
        if ext == ".safetensors":
            sd = load_file(str(path), device="cpu")
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - the weights-only unpickler raises many types on bad files
        raise UpscalerError(
            f"{path.name} could not be read as model weights ({error_text(exc)}). "
            "Only plain weight files are loaded (no pickled code): re-download the file or convert it to .safetensors."
        ) from None
    if not isinstance(sd, dict) or not sd:
        raise UpscalerError(f"{path.name} holds no state dict (got {type(sd).__name__}); it is not a model weights file")
    return sd


# ------------------------------------------------------------------------------- tensor by tensor
# safetensors dtype names -> torch dtypes the pack reads (float8: ComfyUI's fp8 files). Anything else in a
# header (e.g. F8_E8M0, F4, U4) is kept as its name and refused by whoever needs that tensor.
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
_HEADER_LIMIT = 100 << 20  # safetensors' own limit on the JSON header
READ_CHUNK = 1 << 20  # bytes of a stored tensor staged per conversion step


class SafetensorsFile:
    """A .safetensors file whose header is read and checked up front; tensors are then read one at a time with
    plain reads into fresh CPU tensors (no memory map, no whole-file copy), so a loader can convert each to its
    compute dtype and drop the file's copy at once. Truncated or damaged files are refused by name."""

    def __init__(self, path: str | os.PathLike):
        import json

        self.path = Path(path)
        name = self.path.name
        size = self.path.stat().st_size
        with open(self.path, "rb") as fh:
            head = fh.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n <= 1 or n > _HEADER_LIMIT:
                raise UpscalerError(f"{name} is not a safetensors file (its first 8 bytes are not a header length; "
                                    f"{size} bytes in all): it is damaged or another format renamed. Re-download it")
            if 8 + n > size:
                raise UpscalerError(f"{name} is truncated: {size} bytes, but its header alone needs {8 + n}. The "
                                    "download or copy did not finish: re-download the file or copy it again")
            try:
                header = json.loads(fh.read(n))
            except (UnicodeDecodeError, ValueError):
                raise UpscalerError(f"{name}: the safetensors header is not valid JSON; the file is damaged. "
                                    "Re-download it") from None
        if not isinstance(header, dict):
            raise UpscalerError(f"{name}: the safetensors header is not a table of tensors; the file is damaged. "
                                "Re-download it")
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start, self.size = 8 + n, size
        self.infos: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        end_max = 0
        for key, info in header.items():
            try:
                dtype, shape, (begin, end) = info["dtype"], tuple(int(s) for s in info["shape"]), info["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise UpscalerError(f"{name}: the header entry of {key} is malformed; the file is damaged. "
                                    "Re-download it") from None
            itemsize = SAFETENSORS_DTYPES[dtype].itemsize if dtype in SAFETENSORS_DTYPES else None
            numel = 1
            for s in shape:
                numel *= s
            if not (0 <= begin <= end) or (itemsize is not None and end - begin != numel * itemsize):
                raise UpscalerError(f"{name}: tensor {key} has inconsistent offsets in the header; the file is "
                                    "damaged. Re-download it")
            self.infos[key] = (dtype, shape, begin, end)
            end_max = max(end_max, end)
        if self.data_start + end_max > size:
            raise UpscalerError(
                f"{name} is truncated: its header describes {self.data_start + end_max} bytes but the file has "
                f"{size} ({100 * size / (self.data_start + end_max):.0f} %). The download or copy did not finish: "
                "re-download the file or copy it again")

    def keys(self):
        return self.infos.keys()

    def __contains__(self, key) -> bool:
        return key in self.infos

    def dtype_name(self, key: str) -> str:
        return self.infos[key][0]

    def shape(self, key: str) -> tuple[int, ...]:
        return self.infos[key][1]

    def meta(self, key: str) -> torch.Tensor:
        """A tensor of the stored shape on the meta device (for configs and shape checks; no data)."""
        dtype, shape, _, _ = self.infos[key]
        return torch.empty(shape, dtype=SAFETENSORS_DTYPES.get(dtype, torch.uint8), device="meta")

    def read(self, key: str, dtype: torch.dtype | None = None, scale: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor in a new CPU tensor: as stored, or converted to `dtype` (times `scale` in fp32 first, when
        given) through a small staging buffer, so a conversion never holds the stored copy of a whole tensor."""
        stored, shape, begin, end = self.infos[key]
        if stored not in SAFETENSORS_DTYPES:
            raise UpscalerError(f"{self.path.name}: tensor {key} is stored as {stored}, a type this pack does not read")
        src = SAFETENSORS_DTYPES[stored]
        dtype = dtype or src
        out = torch.empty(shape, dtype=dtype)
        if end == begin:
            return out
        flat = out.reshape(-1)
        direct = dtype == src and scale is None
        step = flat.numel() if direct else max(1, READ_CHUNK // src.itemsize)
        staging = None if direct else torch.empty(min(step, flat.numel()), dtype=src)
        with open(self.path, "rb") as fh:
            fh.seek(self.data_start + begin)
            for first in range(0, flat.numel(), step):
                n = min(step, flat.numel() - first)
                target = flat[first:first + n] if direct else staging[:n]
                self._fill(fh, memoryview(target.view(torch.uint8).numpy()), key)
                if scale is not None:  # ComfyUI's convert_weight: weight.to(fp32) * scale_weight, then the dtype
                    flat[first:first + n].copy_(target.to(torch.float32).mul_(scale.to(torch.float32)))
                elif not direct:
                    flat[first:first + n].copy_(target)
        return out

    def _fill(self, fh, view: memoryview, key: str) -> None:
        done = 0
        while done < len(view):
            got = fh.readinto(view[done:])
            if not got:
                raise UpscalerError(f"{self.path.name} ended while reading {key}: the file is truncated or changed "
                                    "while loading. Re-download it")
            done += got
