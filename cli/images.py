"""Image files for the command line: which files an INPUT names, what each output is called, reading
and writing them (atomically), and whether an earlier run already finished one.

An output counts as done only when its receipt is complete: the image is written first and the
receipt second (each to a temporary name, then renamed), and the receipt records the image's SHA-256
and the settings that made it. A run killed between the two renames leaves an image without a
receipt, which a resumed run redoes.
"""
from __future__ import annotations

import glob
import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..upscalers.base import UpscalerError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
RECEIPT_SUFFIX = ".json"
_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class Job:
    """One input file and where its result goes."""

    source: Path  # absolute path of the input image
    output: Path  # the upscaled PNG
    receipt: Path  # its JSON receipt, beside it


@dataclass(frozen=True)
class Unmatched:
    """An INPUT that named no image (reported as a failure in the summary)."""

    input: str
    reason: str


def scale_tag(scale: float) -> str:
    return f"x{scale:g}"


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
        return True
    except ValueError:
        return False


def _expand_one(item: str, out_dir: Path) -> list[tuple[Path, Path]] | str:
    """(file, sub-folder of the output it goes to) for one INPUT, or why it names nothing."""
    path = Path(item).expanduser()
    if path.is_dir():
        root = path.resolve()
        # the output folder may sit inside an input folder: its images are results, not inputs
        files = sorted(p for p in root.rglob("*") if _is_image(p) and not _inside(p.resolve(), out_dir))
        return [(p.resolve(), p.parent.relative_to(root)) for p in files] or (
            f"folder has no images ({', '.join(IMAGE_EXTENSIONS)}) in it or its sub-folders")
    if path.is_file():
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            return f"not an image file name (expected one of {', '.join(IMAGE_EXTENSIONS)})"
        return [(path.resolve(), Path())]
    if _GLOB_CHARS & set(item):
        files = sorted(Path(p).resolve() for p in glob.glob(os.path.expanduser(item), recursive=True))
        files = [p for p in files if _is_image(p) and not _inside(p, out_dir)]
        return [(p, Path()) for p in files] or "the pattern matches no image files"
    return "no such file or folder"


def plan_jobs(inputs: list[str], out_dir: str | os.PathLike, scale: float) -> tuple[list[Job], list[Unmatched]]:
    """Files, folders (recursive, by extension) and globs -> jobs, in a stable order.

    An image in folder F at F/a/b.jpg is written to OUT/a/b_x2.5.png (receipt OUT/a/b_x2.5.json);
    files and glob matches go straight into OUT. Two inputs that would write the same output are
    refused (the second is reported), never overwritten silently.
    """
    out = Path(out_dir).expanduser().resolve()
    jobs: list[Job] = []
    problems: list[Unmatched] = []
    seen_sources: set[Path] = set()
    claimed: dict[Path, Path] = {}
    for item in inputs:
        found = _expand_one(item, out)
        if isinstance(found, str):
            problems.append(Unmatched(item, found))
            continue
        for source, sub in found:
            if source in seen_sources:
                continue
            seen_sources.add(source)
            output = out / sub / f"{source.stem}_{scale_tag(scale)}.png"
            if output in claimed:
                problems.append(Unmatched(str(source), f"its output {output.name} would overwrite the output of "
                                                       f"{claimed[output]}: rename one of them or run them separately"))
                continue
            claimed[output] = source
            jobs.append(Job(source, output, output.with_suffix(RECEIPT_SUFFIX)))
    return jobs, problems


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


# ------------------------------------------------------------------------------------- writing
def to_uint8(image: torch.Tensor) -> np.ndarray:
    """1,H,W,C float 0..1 -> H,W,C uint8, rounded half to even (as zoom.geometry.to_pil)."""
    arr = image[0].detach().float().cpu().numpy()
    return np.rint(np.clip(arr, 0.0, 1.0) * np.float32(255.0)).astype(np.uint8)


def encode_png(image: torch.Tensor) -> bytes:
    arr = to_uint8(image)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr), "RGBA" if arr.shape[-1] == 4 else "RGB").save(buf, format="PNG")
    return buf.getvalue()


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary name beside `path`, then rename: readers see the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        with open(part, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(part, path)
    finally:
        if part.exists():
            part.unlink()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def unfinished_reason(job: Job, settings: dict) -> str | None:
    """None when an earlier run finished `job` with these settings; else why it must (re)run."""
    if not job.receipt.is_file():
        return "no receipt"
    try:
        done = json.loads(job.receipt.read_text())["cli"]
        recorded, expected_sha = done["settings"], done["output_sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return "receipt incomplete"
    if not isinstance(recorded, dict) or recorded.get("model_sha256") != settings.get("model_sha256"):
        return "made by other model weights"  # also a receipt from before the weights' hash was recorded
    if recorded != settings:
        return "made with other settings"
    try:
        actual = sha256_bytes(job.output.read_bytes())
    except OSError:
        return "image missing"
    if actual != expected_sha:
        return "image does not match its receipt"
    try:
        same_input = done.get("input_sha256") == sha256_bytes(job.source.read_bytes())
    except OSError:
        return "input unreadable"
    return None if same_input else "input changed"
