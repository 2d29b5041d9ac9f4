"""Safe, lazy reading of RAM / DAPE checkpoints.

`torch.load(weights_only=True)` only: a pickle that needs any global outside torch's weights-only
allowlist (a class, a function...) is refused with the globals named, and is never unpickled any other
way. Zip-format files are memory-mapped, so the 5.6 GB RAM checkpoint (weights plus what training
left in it) costs only the pages of the tensors that are really copied out. `.safetensors` works too.
"""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Callable

import torch

from ...runtime.errors import UpscalerError

WRAPPERS = ("model", "state_dict", "params")  # training scripts nest the weights under one of these


def unsafe_globals(path: Path) -> list[str]:
    """The globals a checkpoint's pickle names beyond torch's weights-only allowlist (scanned, not run)."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # a scan of a damaged file: the load error itself is reported instead
        return []


def open_state_dict(path: str | Path, *, what: str, keep: Callable[[str], bool] = lambda key: True
                    ) -> dict[str, torch.Tensor]:
    """The flat {name: tensor} of a checkpoint, only the names `keep` accepts; tensors stay memory-mapped
    (nothing is read until they are copied). `what` names the input in errors (e.g. "ram_model").
    """
    path = Path(path)
    if not path.is_file():
        raise UpscalerError(f"{what}: {path} is not a file; put the checkpoint in models/RAM and refresh")
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:  # reads only the tensors asked for
                return {k.removeprefix("module."): f.get_tensor(k) for k in f.keys() if keep(k.removeprefix("module."))}
        except Exception as exc:
            raise UpscalerError(f"{what}: {path.name} is not a readable .safetensors file ({str(exc)[:200]})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        names = unsafe_globals(path)
        if not names and "Unsupported global" not in str(exc):  # a damaged or foreign file, not a code payload
            raise UpscalerError(f"{what}: {path.name} is not a PyTorch checkpoint torch can read "
                                f"({_reason(exc)}); download it again") from None
        raise UpscalerError(
            f"{what}: {path.name} needs pickled code to load ({', '.join(names) or _reason(exc)}), and the pack "
            "only loads weights (torch.load(weights_only=True)); it was not loaded. Use the original file from its "
            "publisher, or re-save just its weights (a dict of tensors) as .safetensors or .pth"
        ) from None
    except Exception as exc:  # torch's unpickler raises many kinds (IndexError, KeyError...) on damaged files
        raise UpscalerError(f"{what}: {path.name} is not a PyTorch checkpoint torch can read ({_reason(exc)}); "
                            "download it again") from None
    return flat_tensors(obj, path.name, what, keep)


def _reason(exc: Exception) -> str:
    """The informative part of torch's load error (the paragraph after its weights-only boilerplate), shortened."""
    parts = [p.strip() for p in str(exc).split("\n\n") if p.strip()]
    return (parts[1] if len(parts) > 1 and "WeightsUnpickler" in parts[0] else parts[0] if parts else type(exc).__name__)[:200]


def flat_tensors(obj, name: str, what: str, keep: Callable[[str], bool]) -> dict[str, torch.Tensor]:
    for key in WRAPPERS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not any(torch.is_tensor(v) for v in obj.values()):
        raise UpscalerError(f"{what}: {name} holds no weights (expected a dict of tensors, possibly under "
                            f"{' / '.join(repr(k) for k in WRAPPERS)}); got {type(obj).__name__}")
    # "module." comes from DataParallel-saved files; what is not kept is dropped before anything is read
    return {k.removeprefix("module."): v for k, v in obj.items()
            if isinstance(k, str) and torch.is_tensor(v) and keep(k.removeprefix("module."))}
