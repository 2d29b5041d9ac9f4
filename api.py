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
nothing is downloaded. `diffusers/<folder>` and `checkpoints/<file>` name the SD x4 upscaler or SD3
medium, which with the Chain-of-Zoom LoRA files (loras/chain-of-zoom/) loads Chain-of-Zoom's own model;
`load_tagger()` loads the DAPE tag prompts from RAM/.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Union

import numpy as np
import torch
from PIL import Image

from .assets import discovery
from .assets.bundled_model import BUNDLED_MODEL
from .imaging.image_io import has_alpha, pil_pixels, read_image, to_uint8
from .runtime.devices import default_device
from .runtime.errors import UpscalerError
from .tiling import RunHooks
from .upscalers import backends, model_files
from .upscalers.contract import Impl, Upscaler
from .upscalers.impl_policy import check_impl, choose_run, resolve_load_impl
from .upscalers.receipts import Policy, UpscaleReceipt, ZoomLoopReceipt
from .upscalers.request import DEFAULT_OVERLAP, UpscaleRequest
from .upscalers.sdx4 import SDX4Options
from .upscalers.size_guard import check_request
from .upscalers.upscale import upscale
from .zoom import DEFAULT_PROCESS_SIZE, ZoomSettings, zoom_loop

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray, torch.Tensor]


# ------------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class UpscaleResult:
    image: torch.Tensor  # 1,H,W,C float32 in 0..1 (C = 4 when the input had alpha)
    receipt: UpscaleReceipt  # what ran: model, scale plan, tiles, retries, fallbacks, seconds (docs/receipts.md)

    def pil(self) -> Image.Image:
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

    def t5_tokenizer_dir(self) -> Path | None:
        """The T5 tokenizer for SD3 single files: ComfyUI's bundled one when a ComfyUI is given."""
        comfy = self.comfy_models()
        return comfy.parent / "comfy" / "text_encoders" / "t5_tokenizer" if comfy is not None else None


def resolve_file(name: str | os.PathLike, kinds: tuple[str, ...], places: ModelPlaces, what: str) -> Path:
    """A weights file from a path, or a name inside one of the model folders `kinds` (e.g. loras, text_encoders)."""
    path = Path(name).expanduser()
    if path.is_file():
        return path.resolve()
    locations = places.locations()
    if not path.is_absolute():
        for kind in kinds:
            try:
                return discovery.locate(str(name), kind, locations).path
            except UpscalerError:
                continue
    searched = ", ".join(str(Path(d)) for kind in kinds for d in locations.folders(kind))
    raise UpscalerError(f"{what} {str(name)!r} not found: it is not a file, nor a name in {searched}; give its path "
                        "or put it in one of those folders")


# the text encoder files an SD3 checkpoint may lack, by role, as ComfyUI users name them (first found is used)
TEXT_ENCODER_NAMES = {"clip_l": ("clip_l.safetensors",), "clip_g": ("clip_g.safetensors",),
                      "t5": ("t5xxl_fp16.safetensors", "t5xxl_fp8_e4m3fn_scaled.safetensors",
                             "t5xxl_fp8_e4m3fn.safetensors")}
TEXT_ENCODER_FOLDERS = ("text_encoders", "clip")


def coz_load_options(base: Path, places: ModelPlaces, transformer_lora=None, vae_lora=None,
                     text_encoders: dict | None = None, use_t5: bool = True, clip_tokenizer=None,
                     t5_tokenizer=None) -> dict:
    """The load options of Chain-of-Zoom's own model, files resolved as the Load Chain-of-Zoom Model node
    lists them: the two LoRA files (default: the authors' names in loras/chain-of-zoom/), the text encoders a
    single-file checkpoint lacks (given, or found under their usual names in text_encoders/ or clip/; the
    ones inside the checkpoint win), the tokenizers (a diffusers folder carries its own)."""
    from .upscalers.coz_sd3 import LORA_FOLDER, TRANSFORMER_LORA, VAE_ENCODER_LORA, TokenizerDirs

    loras = {}
    for key, given, default in (("transformer_lora", transformer_lora, TRANSFORMER_LORA),
                                ("vae_lora", vae_lora, VAE_ENCODER_LORA)):
        loras[key] = resolve_file(given or f"{LORA_FOLDER}/{default}", ("loras",), places,
                                  f"Chain-of-Zoom {key.replace('_', ' ')}")
    text_files: dict[str, Path | None] = {}
    if base.is_file():
        given = dict(text_encoders or {})
        unknown = sorted(set(given) - set(TEXT_ENCODER_NAMES))
        if unknown:
            raise UpscalerError(f"text_encoders: unknown role {unknown[0]!r}; the roles are clip_l, clip_g and t5")
        for role, names in TEXT_ENCODER_NAMES.items():
            if role == "t5" and not use_t5:
                continue
            if given.get(role):
                text_files[role] = resolve_file(given[role], TEXT_ENCODER_FOLDERS, places, f"{role} text encoder")
                continue
            folders = [Path(d) for kind in TEXT_ENCODER_FOLDERS for d in places.locations().folders(kind)]
            text_files[role] = next((d / n for n in names for d in folders if (d / n).is_file()), None)
    dirs = TokenizerDirs(clip_tokenizer or places.tokenizer_dir(), t5_tokenizer or places.t5_tokenizer_dir())
    return {**loras, "text_files": text_files, "tokenizer_dirs": dirs, "use_t5": use_t5}


def resolve_model(name: str, places: ModelPlaces = ModelPlaces()) -> Path:
    """A model path from a path, `diffusers/<folder>`, `checkpoints/<file>` or an upscale_models name."""
    return model_files.resolve_model(name, places.locations())


def load_upscaler(model: str | os.PathLike | None = None, *, impl: str = "auto", dtype: str = "auto",
                  device: str | torch.device | None = None, places: ModelPlaces = ModelPlaces(),
                  tokenizer_dir: str | os.PathLike | None = None, attention_slicing: bool = False,
                  cpu_offload: bool = False, transformer_lora: str | os.PathLike | None = None,
                  vae_lora: str | os.PathLike | None = None, text_encoders: dict | None = None, use_t5: bool = True,
                  t5_tokenizer_dir: str | os.PathLike | None = None) -> Upscaler:
    """Load one upscaler: a GAN (spandrel), the SD x4 upscaler, or Chain-of-Zoom's own model. `model` None = the
    bundled model.

    `impl` auto follows the file; gan / diffusion insist on that kind (an error names the mismatch).
    Chain-of-Zoom's own model is SD3 medium (`diffusers/<folder>`, `checkpoints/sd3_medium*.safetensors` or a
    path) with the authors' LoRA files: `transformer_lora` / `vae_lora` (paths or names in loras/; default
    chain-of-zoom/model_20001.pkl and chain-of-zoom/vae_encoder_20001.pt), `text_encoders` {"clip_l", "clip_g",
    "t5": path or name in text_encoders/ or clip/} for a single file that lacks them (default: clip_l.safetensors,
    clip_g.safetensors, t5xxl_fp16.safetensors where present), `use_t5` False to load without T5; `tokenizer_dir`
    / `t5_tokenizer_dir`: the CLIP / T5 tokenizers for a single file (ComfyUI's with `comfyui_root`). The same
    model as the Load Chain-of-Zoom Model node loads from the same files.
    """
    path = resolve_model(str(model) if model is not None else BUNDLED_MODEL, places)
    extra = {}
    if backends.backend_for(path).id == "coz_sd3":
        extra = coz_load_options(path, places, transformer_lora, vae_lora, text_encoders, use_t5, tokenizer_dir,
                                 t5_tokenizer_dir)
    elif transformer_lora or vae_lora:
        raise UpscalerError(f"transformer_lora / vae_lora are Chain-of-Zoom's LoRA files for SD3 medium; {path.name} is "
                            "not SD3 medium (a diffusers folder or sd3_medium*.safetensors)")
    return backends.load_model_path(path, impl=impl, dtype=dtype, device=pick_device(device),
                                  tokenizer_dir=tokenizer_dir or places.tokenizer_dir(),
                                  attention_slicing=attention_slicing, offload=cpu_offload, **extra)


def plan_upscaler(scale: float | None, model: str | os.PathLike | None = None, *, impl: str = "auto",
                  places: ModelPlaces = ModelPlaces()):
    """select_upscaler's choice without loading anything: (the model's path, the impl policy's RunChoice);
    the weights that run are `path` when choice.use_loaded, else folder_gan(choice.gan_scale)'s."""
    check_impl(impl)
    if model is None and impl == "diffusion":
        raise UpscalerError("impl diffusion needs the Stable Diffusion x4 upscaler: give its diffusers folder "
                            "(diffusers/<folder> or a path) or x4-upscaler-ema.safetensors as the model")
    path = resolve_model(str(model) if model is not None else BUNDLED_MODEL, places)
    kind = resolve_load_impl(impl, backends.is_diffusion_model(path), path.name)
    return path, choose_run(impl, scale, kind)


def select_upscaler(scale: float | None, model: str | os.PathLike | None = None, *, impl: str = "auto",
                    dtype: str = "auto", device: str | torch.device | None = None,
                    places: ModelPlaces = ModelPlaces(), **load_kw) -> tuple[Upscaler, Policy]:
    """The upscaler a request for `scale` runs under the impl policy (as the Tiled Upscale node), and why.

    auto with the SD x4 model below 3x runs a GAN from the model folders instead (x2plus for ~2x,
    else a x4 GAN, else the bundled model); the SD x4 weights are then never loaded.
    """
    path, choice = plan_upscaler(scale, model, impl=impl, places=places)
    policy = Policy(impl, choice.impl, choice.reason)
    if choice.use_loaded:
        return load_upscaler(path, impl=impl, dtype=dtype, device=device, places=places, **load_kw), policy
    upscaler = folder_gan(choice.gan_scale, dtype=dtype, device=device, places=places)
    return upscaler, Policy(impl, choice.impl, f"{choice.reason} ({upscaler.source.file})")


def folder_gan(native: int, *, dtype: str = "auto", device: str | torch.device | None = None,
               places: ModelPlaces = ModelPlaces()) -> Upscaler:
    """A GAN from the model folders for a native scale (Real-ESRGAN first, any x2/x4 name next), else the
    bundled model: what impl auto / gan runs next to an SD x4 model, and the SD x4 out-of-memory fallback."""
    path = model_files.folder_gan_path(native, places.locations())
    return load_upscaler(path, impl="gan", dtype=dtype, device=device, places=places)


def pick_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return default_device()
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UpscalerError(f"device {device!r} is not a torch device name; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UpscalerError(f"device {device}: CUDA is not available in this torch build/machine; use cpu or auto")
    return dev


# ------------------------------------------------------------------------------------- images
def as_image(image: ImageLike, *, check: Callable[[int, int, int], None] | None = None) -> torch.Tensor:
    """A path, PIL image, H,W[,C] array or 1,H,W,C / H,W,C tensor -> 1,H,W,C float32 in 0..1.

    Floats are taken as 0..1; uint8 is scaled by 1/255 and uint16 by 1/65535 (white stays white); other
    dtypes (bool, signed or wider integers, complex) are refused by name, as their white is unknown. For a
    path or a PIL image, `check(width, height, channels)` sees the size (a file's header) before a pixel is
    decoded.
    """
    if isinstance(image, (str, os.PathLike)):
        return read_image(image, check=check)
    if isinstance(image, Image.Image):
        if check is not None:  # Image.open is lazy: nothing is decoded yet
            check(*image.size, 4 if has_alpha(image) else 3)
        image = pil_pixels(image)  # as the file would read: 16-bit grey keeps its precision
    white = {"uint8": 255.0, "uint16": 65535.0}  # the integer dtypes pixels come in, and their white

    def refuse(kind: str, dtype: str) -> UpscalerError:
        return UpscalerError(
            f"image: a {kind} of dtype {dtype} is not a pixel type this pack can scale; expected float (0..1), "
            "uint8 (0..255) or uint16 (0..65535). Fix: convert it first, e.g. x.astype(np.float32) / x.max() "
            "(x.float() / x.max() for a tensor) for other integer data, x.astype(np.float32) for a bool mask, "
            "or x.astype(np.uint8) when it holds 0..255")

    if isinstance(image, np.ndarray):
        name = image.dtype.name
        if image.dtype.kind == "f":
            arr = image.astype(np.float32)
        elif name in white:
            arr = image.astype(np.float32) / np.float32(white[name])
        else:
            raise refuse("numpy array", name)
        image = torch.from_numpy(np.ascontiguousarray(arr))
    if isinstance(image, torch.Tensor):
        name = str(image.dtype).removeprefix("torch.")
        if not (image.is_floating_point() or name in white):
            raise refuse("tensor", name)
        if image.ndim == 2:
            image = image[..., None]
        image = (image[None] if image.ndim == 3 else image).float()
        return image / white[name] if name in white else image
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
    options = (sdx4 or SDX4Options()) if upscaler.capabilities.impl is Impl.DIFFUSION else None
    # a file's size is checked from its header: an upscale refused anyway never decodes the image
    pixels = as_image(image, check=lambda w, h, c: check_request(upscaler, w, h, c, scale, strict_scale=strict_scale))
    request = UpscaleRequest(scale=scale, tile=tile, overlap=overlap, strict_scale=strict_scale, resample=resample,
                             prompt=prompt, seed=seed, options=options, policy=policy, fallbacks=("gan",))
    out, receipt = upscale(upscaler, pixels, request, device=dev, hooks=RunHooks(progress=progress), gan=fallback)
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


def load_tagger(ram_model: str | os.PathLike = "ram_swin_large_14m.pth", dape: str | os.PathLike | None = "DAPE.pth",
                *, max_tags: int = 0, drop_tags: str = "", keep_tags: str = "", threshold_offset: float = 0.0,
                dtype: str = "auto", device: str | torch.device | None = None, places: ModelPlaces = ModelPlaces()):
    """The DAPE / RAM tag prompt model (the published `dape` prompt, as the Load Tagger node): RAM Swin-L with the
    DAPE LoRA merged (`dape` None: plain RAM). Paths, or names in the models root's RAM/ folder."""
    from .zoom.tagger import TaggerProvider, tagger_dtype

    dev = pick_device(device)
    ram_path = resolve_file(ram_model, ("RAM",), places, "RAM model")
    dape_path = None if dape in (None, "", "none") else resolve_file(dape, ("RAM",), places, "DAPE LoRA")
    if dape_path is not None and dape_path.resolve() == ram_path.resolve():
        raise UpscalerError(f"dape: {dape} is the RAM checkpoint itself; give DAPE.pth or None")
    provider = TaggerProvider.load(ram_path, dape_path, dtype=tagger_dtype(dtype, dev), max_tags=max_tags,
                                   drop_tags=drop_tags, keep_tags=keep_tags, threshold_offset=threshold_offset)
    provider.module().to(dev)
    return provider


def chain_of_zoom(upscaler: Upscaler | None, image: ImageLike, steps: int = 4, *, mode: str = "recursive_multiscale",
                  process_size: int = DEFAULT_PROCESS_SIZE, prompt: str = "", prompt_model=None,
                  color_fix: str = "wavelet", seed: int = 0, sampling: str = "sample", tile: int = 0,
                  overlap: int = 0, device: str | torch.device | None = None,
                  on_state: Callable[[int, Image.Image], None] | None = None) -> ZoomResult:
    """Chain-of-Zoom extreme zoom of one image: x0 and `steps` 4x scale-states (what the Loop node runs).

    `prompt_model`: load_prompt_model() (a VLM) or load_tagger() (DAPE tags). `sampling` (Chain-of-Zoom's own
    model): "sample", the paper's posterior sample with noise from `seed`, or "mean", the posterior mean.
    `tile` / `overlap`: input px for every upscaler (0 = auto; converted for the latent-tiled models).
    """
    settings = ZoomSettings(mode=mode, process_size=process_size, user_prompt=prompt, provider=prompt_model,
                            color_fix=color_fix, seed=seed, sampling=sampling, tile=tile, overlap=overlap,
                            device=pick_device(device))
    tensor = as_image(image)[:1]
    callback = (lambda _index, n, state: on_state(n, state)) if on_state else None
    result = zoom_loop(upscaler, tensor, steps, settings, on_state=callback)
    return ZoomResult(result.states[0], result.prompts[0], result.receipt)


__all__ = ["ModelPlaces", "folder_gan", "UpscaleResult", "ZoomResult", "as_image", "chain_of_zoom", "load_prompt_model",
           "load_tagger", "load_upscaler", "pick_device", "plan_upscaler", "resolve_file", "resolve_model",
           "select_upscaler", "upscale_image"]
