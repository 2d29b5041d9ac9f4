"""Image files for the command line: which files an INPUT names, what each output is called, writing
them (atomically), and whether an earlier run already finished one (decoding is imaging/image_io.py).

An output counts as done only when its receipt is complete: the image is written first and the
receipt second (each to a temporary name, then renamed), and the receipt records the image's SHA-256
and the settings that made it. A run killed between the two renames leaves an image without a
receipt, which a resumed run redoes.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

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


# ------------------------------------------------------------------------------------- writing
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
