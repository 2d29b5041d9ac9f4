"""The pack as a Python library (no ComfyUI): load an upscaler, upscale an image, Chain-of-Zoom.

    from dreamforge_upscale.api import load_upscaler, upscale_image, chain_of_zoom

    up = load_upscaler()                                  # the bundled realesr-animevideov3 (x4)
    result = upscale_image(up, "photo.jpg", 2.5)          # UpscaleResult
    result.pil().save("photo_x2.5.png"); print(result.receipt.output_size)
    zoom = chain_of_zoom(up, "photo.jpg", steps=3, process_size=256)
    zoom.strip().save("zoom.png"); print(zoom.prompts)

Models are found as the `assets` command finds them: a path, or a name in the models root
(--models-root / $DF_MODELS_ROOT / ~/.cache/dreamforge-upscale/models), in a ComfyUI install's
models/ folders (`comfyui_root`), in the local mirror ($DF_LOCAL_MIRROR) or the runtime cache;
nothing is downloaded. `diffusers/<folder>` and `checkpoints/<file>` name the SD x4 upscaler.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Union

import numpy as np
import torch
from PIL import Image

from .tiling import RunHooks
from .upscalers import discovery
from .upscalers.assets import BUNDLED_MODEL
from .upscalers import backends
from .upscalers.base import UpscalerError
from .upscalers.contract import Upscaler
from .upscalers.loading import WEIGHT_EXTENSIONS
from .upscalers.receipts import Policy, UpscaleReceipt, ZoomLoopReceipt
from .upscalers.registry import IMPLS, choose_run, pick_gan, resolve_load_impl
from .upscalers.sdx4 import SDX4Options, is_sdx4_file
from .upscalers.upscale import DEFAULT_OVERLAP, upscale
from .zoom import DEFAULT_PROCESS_SIZE, ZoomSettings, zoom_loop

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray, torch.Tensor]
DIFFUSERS_PREFIX, CHECKPOINTS_PREFIX = "diffusers/", "checkpoints/"


# ------------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class UpscaleResult:
    image: torch.Tensor  # 1,H,W,C float32 in 0..1 (C = 4 when the input had alpha)
    receipt: UpscaleReceipt  # what ran: model, scale plan, tiles, retries, fallbacks, seconds (docs/receipts.md)

    def pil(self) -> Image.Image:
        from .cli.images import to_uint8

        arr = to_uint8(self.image)
        return Image.fromarray(arr, "RGBA" if arr.shape[-1] == 4 else "RGB")


@dataclass(frozen=True)
class ZoomResult:
    states: list[Image.Image]  # x0 (the prepared input), x1 (4x), ... x_steps
    prompts: list[str]  # the prompt of each step (x1 .. x_steps)
    receipt: ZoomLoopReceipt

    def strip(self) -> Image.Image:
        """Every state side by side, left to right (like the authors' output)."""
        w, h = self.states[0].size
        out = Image.new("RGB", (w * len(self.states), h))
        for i, state in enumerate(self.states):
            out.paste(state, (i * w, 0))
        return out


# ------------------------------------------------------------------------------------- models
@dataclass(frozen=True)
class ModelPlaces:
    """Where models are looked up (the same precedence as `assets`): mirror -> model folders -> cache."""

    models_root: str | os.PathLike | None = None
    comfyui_root: str | os.PathLike | None = None
    mirror: str | os.PathLike | None = None

    def comfy_models(self) -> Path | None:
        if self.comfyui_root is None:
            return None
        root = Path(self.comfyui_root).expanduser().resolve()
        if not (root / "models").is_dir():
            raise UpscalerError(f"comfyui_root {root} has no models/ folder: give the ComfyUI folder (the one "
                                "holding main.py and models/)")
        return root / "models"

    def locations(self) -> discovery.Locations:
        base = discovery.Locations.standalone(self.models_root, self.mirror)
        comfy = self.comfy_models()
        if comfy is None:
            return base
        own = base.folders

        def folders(kind: str) -> list[Path]:  # ComfyUI's folders first, as inside ComfyUI
            return [comfy / kind] + own(kind)

        return discovery.Locations(folders, base.mirror, base.use_cache)

    def tokenizer_dir(self) -> Path | None:
        """SD x4's CLIP tokenizer for the single file: ComfyUI's bundled one when a ComfyUI is given."""
        comfy = self.comfy_models()
        return comfy.parent / "comfy" / "sd1_tokenizer" if comfy is not None else None


def resolve_model(name: str, places: ModelPlaces = ModelPlaces()) -> Path:
    """A model path from a path, `diffusers/<folder>`, `checkpoints/<file>` or an upscale_models name."""
    path = Path(name).expanduser()
    if path.exists():
        return path.resolve()
    locations = places.locations()
    for prefix, kind in ((DIFFUSERS_PREFIX, "diffusers"), (CHECKPOINTS_PREFIX, "checkpoints")):
        if name.startswith(prefix):
            rest = name[len(prefix):]
            for folder in locations.folders(kind):
                if (Path(folder) / rest).exists():
                    return Path(folder) / rest
            searched = ", ".join(str(f) for f in locations.folders(kind))
            raise UpscalerError(f"model {name!r}: {rest!r} not found in {searched}; put it there or give its path")
    return discovery.locate(name, "upscale_models", locations).path


def load_upscaler(model: str | os.PathLike | None = None, *, impl: str = "auto", dtype: str = "auto",
                  device: str | torch.device | None = None, places: ModelPlaces = ModelPlaces(),
                  tokenizer_dir: str | os.PathLike | None = None, attention_slicing: bool = False,
                  cpu_offload: bool = False) -> Upscaler:
    """Load one upscaler: a GAN (spandrel) or the SD x4 upscaler. `model` None = the bundled model.

    `impl` auto follows the file; gan / diffusion insist on that kind (an error names the mismatch).
    """
    path = resolve_model(str(model) if model is not None else BUNDLED_MODEL, places)
    return backends.load_upscaler(path, impl=impl, dtype=dtype, device=pick_device(device),
                                  tokenizer_dir=tokenizer_dir or places.tokenizer_dir(),
                                  attention_slicing=attention_slicing, offload=cpu_offload)


def _folder_gan_names(places: ModelPlaces) -> list[str]:
    locations = places.locations()
    listed = [p.name for d in locations.folders("upscale_models") if Path(d).is_dir() for p in sorted(Path(d).iterdir())
              if p.suffix.lower() in WEIGHT_EXTENSIONS and not is_sdx4_file(p)]
    return discovery.model_names("upscale_models", locations, listed)


def select_upscaler(scale: float | None, model: str | os.PathLike | None = None, *, impl: str = "auto",
                    dtype: str = "auto", device: str | torch.device | None = None,
                    places: ModelPlaces = ModelPlaces(), **load_kw) -> tuple[Upscaler, Policy]:
    """The upscaler a request for `scale` runs under the impl policy (as the Tiled Upscale node), and why.

    auto with the SD x4 model below 3x runs a GAN from the model folders instead (x2plus for ~2x,
    else a x4 GAN, else the bundled model); the SD x4 weights are then never loaded.
    """
    if impl not in IMPLS:
        raise UpscalerError(f"impl must be one of {', '.join(IMPLS)}; got {impl!r}")
    if model is None and impl == "diffusion":
        raise UpscalerError("impl diffusion needs the Stable Diffusion x4 upscaler: give its diffusers folder "
                            "(diffusers/<folder> or a path) or x4-upscaler-ema.safetensors as the model")
    path = resolve_model(str(model) if model is not None else BUNDLED_MODEL, places)
    kind = resolve_load_impl(impl, backends.is_diffusion_model(path), path.name)
    choice = choose_run(impl, scale, kind)
    policy = Policy(impl, choice.impl, choice.reason)
    if choice.use_loaded:
        return load_upscaler(path, impl=impl, dtype=dtype, device=device, places=places, **load_kw), policy
    upscaler = folder_gan(choice.gan_scale, dtype=dtype, device=device, places=places)
    return upscaler, Policy(impl, choice.impl, f"{choice.reason} ({upscaler.source.file})")


def folder_gan(native: int, *, dtype: str = "auto", device: str | torch.device | None = None,
               places: ModelPlaces = ModelPlaces()) -> Upscaler:
    """A GAN from the model folders for a native scale (Real-ESRGAN first, any x2/x4 name next), else the
    bundled model: what impl auto / gan runs next to an SD x4 model, and the SD x4 out-of-memory fallback."""
    name = pick_gan(_folder_gan_names(places), native) or BUNDLED_MODEL
    return load_upscaler(name, impl="gan", dtype=dtype, device=device, places=places)


def pick_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UpscalerError(f"device {device!r} is not a torch device name; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UpscalerError(f"device {device}: CUDA is not available in this torch build/machine; use cpu or auto")
    return dev


# ------------------------------------------------------------------------------------- images
def as_image(image: ImageLike) -> torch.Tensor:
    """A path, PIL image, H,W,C uint8/float array or 1,H,W,C / H,W,C tensor -> 1,H,W,C float32 in 0..1."""
    if isinstance(image, (str, os.PathLike)):
        from .cli.images import read_image

        return read_image(image)
    if isinstance(image, Image.Image):
        alpha = image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info)
        image = np.asarray(image.convert("RGBA" if alpha else "RGB"))
    if isinstance(image, np.ndarray):
        arr = image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image.astype(np.float32)
        image = torch.from_numpy(np.ascontiguousarray(arr))
    if isinstance(image, torch.Tensor):
        if image.ndim == 2:
            image = image[..., None]
        return (image[None] if image.ndim == 3 else image).float()
    raise UpscalerError(f"image must be a path, PIL image, numpy array or tensor; got {type(image).__name__}")


def upscale_image(upscaler: Upscaler, image: ImageLike, scale: float | None = None, *, tile: int = 0,
                  overlap: int = DEFAULT_OVERLAP, resample: str = "lanczos", strict_scale: bool = False,
                  prompt: str | None = None, seed: int | None = None, sdx4: SDX4Options | None = None,
                  device: str | torch.device | None = None,
                  progress: Callable[[int, int], None] | None = None,
                  fallback: Callable[[], Upscaler] | None = None, policy: Policy | None = None) -> UpscaleResult:
    """Upscale one image (or a batch tensor) by `scale` (None = the model's native scale).

    `prompt`, `seed` and `sdx4` (steps, guidance, noise level...) go to the SD x4 upscaler (GANs
    record and ignore them); `progress(done, total)` is called per tile.
    """
    dev = pick_device(device)
    options = (sdx4 or SDX4Options()) if upscaler.capabilities.impl == "diffusion" else None
    out, receipt = upscale(upscaler, as_image(image), scale, tile=tile, overlap=overlap, strict_scale=strict_scale,
                           resample=resample, device=dev, hooks=RunHooks(progress=progress), prompt=prompt, seed=seed,
                           options=options, fallback=fallback, policy=policy)
    return UpscaleResult(out.cpu(), receipt)


def load_prompt_model(model: str | os.PathLike, *, dtype: str = "auto", device: str | torch.device | None = None,
                      max_new_tokens: int = 32, temperature: float = 0.0, places: ModelPlaces = ModelPlaces()):
    """A vision-language prompt model (transformers folder with config.json): a path or a folder name in LLM/."""
    from .zoom.vlm import VLMPromptProvider, is_model_folder

    path = Path(model).expanduser()
    if not path.exists():
        found = [Path(d) / str(model) for d in places.locations().folders("LLM") if is_model_folder(Path(d) / str(model))]
        if not found:
            raise UpscalerError(f"prompt model {str(model)!r} is neither a folder nor a model in "
                                f"{', '.join(str(d) for d in places.locations().folders('LLM'))}: give the model folder")
        path = found[0]
    return VLMPromptProvider.load(path, dtype=dtype, device=pick_device(device), max_new_tokens=max_new_tokens,
                                  temperature=temperature)


def chain_of_zoom(upscaler: Upscaler | None, image: ImageLike, steps: int = 4, *, mode: str = "recursive_multiscale",
                  process_size: int = DEFAULT_PROCESS_SIZE, prompt: str = "", prompt_model=None,
                  color_fix: str = "wavelet", seed: int = 0, tile: int = 0, overlap: int = DEFAULT_OVERLAP,
                  device: str | torch.device | None = None,
                  on_state: Callable[[int, Image.Image], None] | None = None) -> ZoomResult:
    """Chain-of-Zoom extreme zoom of one image: x0 and `steps` 4x scale-states (what the Loop node runs)."""
    settings = ZoomSettings(mode=mode, process_size=process_size, user_prompt=prompt, provider=prompt_model,
                            color_fix=color_fix, seed=seed, tile=tile, overlap=overlap, device=pick_device(device))
    tensor = as_image(image)[:1]
    callback = (lambda _index, n, state: on_state(n, state)) if on_state else None
    result = zoom_loop(upscaler, tensor, steps, settings, on_state=callback)
    return ZoomResult(result.states[0], result.prompts[0], result.receipt)


__all__ = ["ModelPlaces", "folder_gan", "UpscaleResult", "ZoomResult", "as_image", "chain_of_zoom", "load_prompt_model",
           "load_upscaler", "pick_device", "resolve_model", "select_upscaler", "upscale_image"]
