"""Safe reading of model files: weights only, never pickled code; clear errors for wrong files."""
from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path

import torch
from safetensors.torch import load_file

from .base import UpscalerError, error_text

WEIGHT_EXTENSIONS = (".pth", ".pt", ".ckpt", ".bin", ".safetensors")


def hash_file(path: str | os.PathLike, digest=None):
    """The pack's one file hasher: `digest` (default SHA-256) fed with the file in 1 MiB chunks."""
    digest = digest or hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest


def sha256_of(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a model file, computed once per file version (path, size, mtime)."""
    st = os.stat(path)
    return _sha256_cached(os.path.realpath(path), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=64)
def _sha256_cached(path: str, _size: int, _mtime_ns: int) -> str:  # size/mtime make edits re-hash
    return hash_file(path).hexdigest()


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
