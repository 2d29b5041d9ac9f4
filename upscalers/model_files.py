"""Model names to files, in one place for the nodes, the library and the command line.

A name is a path, `diffusers/<folder>`, `checkpoints/<file>` or a file name of upscale_models; where it is
looked for is a `discovery.Locations` (ComfyUI's folder lists inside ComfyUI, the standalone folders
outside, the local mirror and the runtime cache in both).
"""
from __future__ import annotations

from pathlib import Path

from ..assets import discovery
from ..assets.bundled_model import BUNDLED_MODEL
from ..assets.hashing import WEIGHT_EXTENSIONS
from ..runtime.errors import UpscalerError
from .impl_policy import pick_gan
from .sdx4 import is_sdx4_file

DIFFUSERS_PREFIX, CHECKPOINTS_PREFIX = "diffusers/", "checkpoints/"
PREFIXED_KINDS = ((DIFFUSERS_PREFIX, "diffusers"), (CHECKPOINTS_PREFIX, "checkpoints"))


def prefixed_path(name: str, locations: discovery.Locations, what: str = "model") -> Path | None:
    """`diffusers/<folder>` or `checkpoints/<file>` -> its path in the first folder holding it; None for any
    other name."""
    for prefix, kind in PREFIXED_KINDS:
        if name.startswith(prefix):
            rest = name[len(prefix):]
            for folder in locations.folders(kind):
                if (Path(folder) / rest).exists():
                    return Path(folder) / rest
            searched = ", ".join(str(f) for f in locations.folders(kind)) or f"models/{kind} (no such folder)"
            raise UpscalerError(f"{what} {name!r}: {rest!r} not found in {searched}; put it there or give its path")
    return None


def resolve_model(name: str, locations: discovery.Locations, what: str = "model") -> Path:
    """A model path from a path, `diffusers/<folder>`, `checkpoints/<file>` or an upscale_models name (mirror >
    folders > cache)."""
    path = Path(name).expanduser()
    if path.exists():
        return path.resolve()
    return prefixed_path(name, locations, what) or discovery.locate(name, "upscale_models", locations).path


def gan_names(locations: discovery.Locations, listed: list[str] | None = None) -> list[str]:
    """The GAN files of upscale_models (`listed`: the host's own listing of its folders), the mirror and the
    cache; the SD x4 checkpoint, which lives there too, is left out."""
    folders = [Path(d) for d in locations.folders("upscale_models")]
    if listed is None:
        listed = [p.name for d in folders if d.is_dir() for p in sorted(d.iterdir())
                  if p.suffix.lower() in WEIGHT_EXTENSIONS]

    def is_gan(name: str) -> bool:
        path = next((d / name for d in folders if (d / name).is_file()), None)
        return path is None or not is_sdx4_file(path)

    return [n for n in discovery.model_names("upscale_models", locations, listed) if is_gan(n)]


def folder_gan_path(native: int, locations: discovery.Locations, listed: list[str] | None = None) -> Path:
    """The GAN a run at `native` scale takes from the folders (impl gan / auto beside SD x4, the SD x4
    out-of-memory fallback): Real-ESRGAN first, any x2/x4 name next, else the bundled model."""
    return resolve_model(pick_gan(gan_names(locations, listed), native) or BUNDLED_MODEL, locations)
