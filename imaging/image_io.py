"""Image pixels in and out: decoding a file into a tensor (EXIF orientation, 16-bit grey, alpha, PIL's
decompression-bomb guard, a size check before decoding), and 8-bit conversion (PNG bytes, PIL images).
Used by the library, the command line, Chain-of-Zoom and the ComfyUI previews alike."""
from __future__ import annotations

import io
import os
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..runtime.errors import UpscalerError

# ------------------------------------------------------------------------------------- reading
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I")


def has_alpha(im: Image.Image) -> bool:
    return im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)


def pil_pixels(im: Image.Image) -> np.ndarray:
    """A PIL image -> H,W,C float32 in 0..1 (C = 4 with alpha, else 3); 16-bit grey keeps its precision."""
    if im.mode in _SIXTEEN_BIT:
        grey = np.asarray(im, dtype=np.float32) / 65535.0
        return np.repeat(np.clip(grey, 0, 1)[..., None], 3, axis=-1)
    return np.asarray(im.convert("RGBA" if has_alpha(im) else "RGB"), dtype=np.float32) / 255.0


def _bomb_error(name: str, exc: Exception) -> UpscalerError:
    return UpscalerError(f"{name}: refused before decoding: {exc} It is a possible decompression bomb (far more "
                         "pixels than its size on disk suggests). Fix: use a smaller image; if you trust the file, "
                         f"raise PIL.Image.MAX_IMAGE_PIXELS (now {Image.MAX_IMAGE_PIXELS}) in your own code before "
                         "calling the library")


def _open_checked(source, name: str) -> Image.Image:
    """Image.open: lazy, it reads the header only. PIL's decompression-bomb guard stays as PIL sets it
    (Image.MAX_IMAGE_PIXELS: a warning above it, an error above twice it); its error gets our message."""
    try:
        return Image.open(source)
    except Image.DecompressionBombError as exc:
        raise _bomb_error(name, exc) from None


def read_image(source: str | os.PathLike | bytes, label: str | None = None,
               check: Callable[[int, int, int], None] | None = None) -> torch.Tensor:
    """An image file (path or its bytes) -> 1,H,W,C float32 in 0..1 (C = 4 when it has alpha, else 3).

    The EXIF orientation is applied (what a viewer shows); 16-bit grey keeps its precision.
    `check(width, height, channels)` sees the size from the file's header before a
    pixel is decoded, and raises to refuse it (e.g. size_guard.check_request: a 230 KB PNG of 9000x9000
    would take gigabytes to decode only to be refused). PIL's decompression-bomb limit is always kept.
    """
    name = label or (str(source) if not isinstance(source, bytes) else "image")
    try:
        with _open_checked(io.BytesIO(source) if isinstance(source, bytes) else source, name) as im:
            if check is not None:
                try:  # the stored size: a quarter turn (EXIF) changes no side length or area the guard weighs
                    check(*im.size, 4 if has_alpha(im) else 3)
                except UpscalerError as exc:
                    raise UpscalerError(f"{name}: {exc}") from None
            im.load()  # decode everything now: a truncated file fails here, not half way through
            arr = pil_pixels(ImageOps.exif_transpose(im))
    except UpscalerError:
        raise  # already names the file and the fix (the size check, the bomb guard)
    except Image.DecompressionBombError as exc:  # some formats only know their size once decoding
        raise _bomb_error(name, exc) from None
    except UnidentifiedImageError:
        raise UpscalerError(f"{name}: not an image format Pillow can read (damaged, or not an image): replace it "
                            "or remove it from the input") from None
    except (OSError, ValueError) as exc:
        raise UpscalerError(f"{name}: not a readable image ({type(exc).__name__}: {str(exc)[:160]}); the file is "
                            "damaged or truncated: replace it or remove it from the input") from None
    return torch.from_numpy(np.ascontiguousarray(arr))[None]


# ------------------------------------------------------------------------------------- 8-bit and PNG
def to_uint8(image: torch.Tensor) -> np.ndarray:
    """1,H,W,C float 0..1 -> H,W,C uint8, rounded half to even (as to_pil)."""
    arr = image[0].detach().float().cpu().numpy()
    return np.rint(np.clip(arr, 0.0, 1.0) * np.float32(255.0)).astype(np.uint8)


def encode_png(image: torch.Tensor) -> bytes:
    arr = to_uint8(image)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr), "RGBA" if arr.shape[-1] == 4 else "RGB").save(buf, format="PNG")
    return buf.getvalue()




def to_pil(image: torch.Tensor) -> Image.Image:
    """One ComfyUI image (H,W,C or 1,H,W,C float 0..1; grey/RGB/RGBA) -> 8-bit RGB, rounded (the
    reference truncates) and alpha dropped (as the reference's convert('RGB'))."""
    if image.ndim == 4:
        if image.shape[0] != 1:
            raise ValueError(f"to_pil takes one image, got a batch of {image.shape[0]}")
        image = image[0]
    rgb = image[..., :3] if image.shape[-1] >= 3 else image[..., :1].expand(-1, -1, 3)
    # numpy (one thread, no per-op overhead): the same float32 clamp/scale/round-half-even as torch
    arr = np.rint(np.clip(rgb.detach().float().cpu().numpy(), 0.0, 1.0) * np.float32(255.0))
    return Image.fromarray(np.ascontiguousarray(arr.astype(np.uint8)), "RGB")


def from_pil(image: Image.Image) -> torch.Tensor:
    """8-bit PIL image -> 1,H,W,3 float32 in 0..1 (exact)."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr.copy())[None]
