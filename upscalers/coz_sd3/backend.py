"""Chain-of-Zoom's own super-resolver behind the Upscaler protocol: SD3 medium + the authors' LoRA, one step.

As a 4x upscaler of x: PIL-bicubic 4x of x on the 8-bit grid (the 8-bit RGB image the authors' loop resizes),
then the one SR step at that size (the model restores at a fixed size; Chain-of-Zoom feeds it the bicubic
view). impl "diffusion", tiling "internal". What still differs from the authors' step, on purpose, is in
DIFFERENCES below, in every receipt's notes and in docs/coz_model.md, each with its measured size.
"""
from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ...runtime.devices import default_device
from ...runtime.dtypes import DTYPE_NAMES, dtype_name, select_dtype, vae_dtype_for
from ...runtime.errors import UpscalerError
from ...tiling import RunHooks
from ..contract import Capabilities, Conditioning, Impl, ModelSource, WindowResult
from . import step
from .components import CoZComponents, TokenizerDirs, is_sd3_folder, load_diffusers_folder
from .lora import LORA_FOLDER, TRANSFORMER_LORA, VAE_ENCODER_LORA, merge_transformer_lora, merge_vae_encoder_lora
from .memory_plan import check_before_load
from .prompt import encode_prompt
from .single_file import load_single_files

ZOOM_PX = step.ZOOM**2  # output px per input px (the memory estimate per input pixel scales by it)
ARCHITECTURE = "Chain-of-Zoom SR (SD3 medium + CoZ LoRA, one step)"
NO_T5_NOTE = ("no T5 text encoder: its 512 tokens are zeros (as diffusers does without T5), so the prompt "
              "embedding differs from the paper's; add t5xxl_fp16.safetensors for the published conditioning")
SR_INPUT = "8-bit RGB, PIL BICUBIC x4, /255 (the authors' input)"
# The deliberate differences from the authors' step, each with its size as measured on the tests' tiny random
# SD3 (tests/test_coz_parity.py; 8-bit levels, one SR step unless said; a random model is far more sensitive
# than SD3 medium, so these are upper-side figures, not SD3 medium's). docs/coz_model.md lists them too.
DIFFERENCES = {
    "merged_lora": ("difference from the paper: the transformer LoRA is merged into the weights (fp32); the authors' "
                    "layer rounds the modulation to fp16 - SR output before 8 bits: mean 0.0006, max 0.02 levels; "
                    "after 4 recursive steps on the tiny random test model: states mean <= 1.0, max 34"),
    "sampling_sample": ("difference from the paper: the posterior noise is drawn from the seed (on the CPU); the "
                        "authors never seed it - with the same draw the output is theirs (max 1 level, where 8-bit "
                        "truncation flips), and two of their runs differ as two seeds do (tiny test model: mean 40 "
                        "levels); sampling 'mean' removes the noise"),
    "sampling_mean": ("difference from the paper: sampling 'mean' encodes to the posterior mean (deterministic, no "
                      "seed); the paper samples the posterior (tiny test model: mean 37 levels from a sample)"),
    "tiled": ("difference from the paper: past the position grid (SD3 medium: 384 latent px, 3072 px per side) the "
              "transformer runs on latent tiles blended with cos^2 weights; the authors' 512 px loop never tiles "
              "(tiny test model, whose grid is 32 latent px: 3 x 3 windows of 16 over a 32 px latent vs one call: "
              "mean 20 levels)"),
    "padded": ("difference from the paper: sides that are not multiples of 16 are padded (reflected) for the step and "
               "cropped back; the authors' code takes only multiples of 16 (no counterpart to measure)"),
    "precision": ("difference from the paper: the transformer runs in bf16/fp16 (dtype auto on CUDA) where the authors "
                  "run fp32 (tiny test model, bf16 transformer: mean 0.27, max 9 levels); dtype fp32 is theirs"),
    "text_fp32": ("difference from the paper: the text encoders run in fp32 (the CPU, or dtype fp32) where the authors "
                  "run fp16 (tiny test model: mean 0.004, max 1 level)"),
}
ONESTEP_NOTE = ("difference from the paper (mode onestep): the model enlarges the x0 crop after it was reduced to "
                "process_size/4 (what every 4x upscaler is given); the authors resize the crop straight to "
                "process_size - SR input mean 0.14, max 2 levels at step 2 (tiny test model output: mean 3 levels)")


class CoZModules(torch.nn.Module):
    """Plain holders for memory managers (ComfyUI's ModelPatcher sets `.device`, read-only on diffusers models)."""

    def __init__(self, **modules: torch.nn.Module):
        super().__init__()
        for name, module in modules.items():
            setattr(self, name, module)


@dataclass(frozen=True)
class Residency:
    """How networks get onto the device before use (load-time choice; ComfyUI's memory manager supplies one).

    text(bytes) runs before the text encoders encode, main(bytes) before the transformer and VAE run;
    the default moves them with .to() and sends the text encoders back to the CPU after use on a GPU.
    A host makes one for the loaded networks (`load(residency=...)`: a function of the main and the text
    module); `held` is what it registered them as (ComfyUI: their ModelPatchers, main first), kept alive
    with the model.
    """

    text: Callable[[int], None] | None = None
    main: Callable[[int], None] | None = None
    release_text: Callable[[], None] | None = None
    held: tuple = ()


# The host's residency for the loaded networks: (main module, text module) -> Residency
ResidencyFor = Callable[[torch.nn.Module, torch.nn.Module], Residency]


def select_dtypes(requested: str, device: torch.device) -> tuple[torch.dtype, torch.dtype, torch.dtype]:
    """(transformer, VAE, text encoders). auto on CUDA: bf16 transformer (fp16 where bf16 is missing), fp32 VAE,
    fp16 text encoders (the reference's); fp32 everywhere on the CPU. The VAE is never fp16."""
    main = select_dtype(requested, device, prefer="bf16")
    if device.type != "cuda":
        return main, torch.float32, torch.float32
    return main, vae_dtype_for(main, device) if main == torch.bfloat16 else torch.float32, (
        torch.float32 if main == torch.float32 else torch.float16)


class CoZSD3Upscaler:
    """Load-time choices (weights, dtypes, residency) live here; per-call settings go to upscale_window."""

    def __init__(self, comps: CoZComponents, source: ModelSource, files: list[dict], dtype=torch.float32,
                 vae_dtype=torch.float32, text_dtype=torch.float32, residency: ResidencyFor | None = None):
        if vae_dtype == torch.float16:
            raise UpscalerError("the SD3 VAE is kept in fp32 or bf16 (fp16 overflows in its decoder)")
        self.comps, self.source, self.files = comps, source, files
        self.dtype, self.vae_dtype, self.text_dtype = dtype, vae_dtype, text_dtype
        self.offload = False  # the text encoders and the main networks move through `residency` instead
        self.load_memory: dict | None = None  # load's estimate, free memory and any dtype lowered to fit (load())
        for module, wanted in ((comps.transformer, dtype), (comps.vae, vae_dtype),
                               *((enc, text_dtype) for enc in self.text_encoders())):
            if next(module.parameters()).dtype != wanted:
                module.to(dtype=wanted)
        self.holder = CoZModules(transformer=comps.transformer, vae=comps.vae).eval().requires_grad_(False)
        self.text_holder = CoZModules(**{k: getattr(comps, k) for k in ("clip_l", "clip_g", "t5")
                                         if getattr(comps, k) is not None}).eval().requires_grad_(False)
        self.residency = residency(self.holder, self.text_holder) if residency else Residency()
        per_input_px = ZOOM_PX * step.transformer_bytes_per_latent_px(comps.transformer, torch.float32) / 4
        self.capabilities = Capabilities(
            impl=Impl.DIFFUSION, native_scales=(step.ZOOM,), dtypes=DTYPE_NAMES, size_multiple=1,
            min_size=1, square=False, context=0, bytes_per_pixel=per_input_px,
            in_channels=3, out_channels=3, prompted=True, whole_image=True,
        )

    @property
    def scale(self) -> int:
        return step.ZOOM

    def module(self) -> torch.nn.Module:
        return self.holder

    def text_module(self) -> torch.nn.Module:
        return self.text_holder

    def text_encoders(self) -> list[torch.nn.Module]:
        return [m for m in (self.comps.clip_l, self.comps.clip_g, self.comps.t5) if m is not None]

    def prompt_embeddings(self, text: str, device: torch.device, cond: Conditioning | None = None,
                          hooks: RunHooks | None = None) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(seq, pooled, reused): within one run (cond.memo) the encoders run once per prompt text."""
        memo = (cond or Conditioning()).memo
        (seq, pooled), reused = memo.get_or_make(("coz_sd3 prompt", id(self), text, str(device)),
                                                 lambda: self._encode(text, device, hooks))
        return seq, pooled, reused

    def _encode(self, text: str, device: torch.device, hooks: RunHooks | None) -> tuple[torch.Tensor, torch.Tensor]:
        r = self.residency
        if r.text:
            r.text(0)
        else:
            self.text_holder.to(device)
        with torch.inference_mode():
            seq, pooled = encode_prompt(self.comps, text, device, self.comps.transformer.config.joint_attention_dim)
        if r.release_text:
            r.release_text()
        elif device.type != "cpu":
            # the transformer needs the room more than the encoders
            self.text_holder.to((hooks.offload_device if hooks else None) or torch.device("cpu"))
        return seq, pooled

    def upscale_window(self, x: torch.Tensor, cond: Conditioning, hooks: RunHooks) -> WindowResult:
        """x: B,3,h,w in 0..1 -> B,3,4h,4w in 0..1 (float32); the report has seed, prompt state, tiles, notes."""
        opts, note = step.CoZOptions.from_any(cond.options)
        opts.check()
        seed = secrets.randbits(63) if cond.seed is None else int(cond.seed)
        text = "" if cond.prompt is None else str(cond.prompt)
        device = x.device
        seq, pooled, reused = self.prompt_embeddings(text, device, cond, hooks)
        h, w = x.shape[-2:]
        big = step.bicubic_8bit(x, step.ZOOM)  # the whole pass input at once: tiles are cut from it
        padded = step.pad_to_multiple(big)
        if self.residency.main:
            self.residency.main(int(padded.shape[-2] * padded.shape[-1] / 64 * step.transformer_bytes_per_latent_px(
                self.comps.transformer, self.dtype)))
        else:
            self.holder.to(device)
        with torch.inference_mode():
            y, stages = step.sr_step(self.comps, padded, seq, pooled, opts, seed, device, self.dtype, self.vae_dtype,
                                     hooks)
        notes = self.differences(opts, stages, padded.shape[-2:] != big.shape[-2:])
        notes += ([NO_T5_NOTE] if self.comps.t5 is None else []) + ([note] if note else [])
        if self.load_memory and self.load_memory["note"]:
            notes.append(self.load_memory["note"])
        # the weights files with their hashes (base and both LoRA): receipts quote the source by its base file only
        report = {**stages, "seed": seed, "sampling": opts.sampling,
                  "prompt_embedding": "reused" if reused else "encoded", "sr_input": SR_INPUT,
                  "sr_input_size": [padded.shape[-1], padded.shape[-2]], "notes": notes, "networks": self.networks(),
                  "model_files": self.files, "load_memory": self.load_memory}
        return WindowResult(y[..., : h * step.ZOOM, : w * step.ZOOM], report)

    def differences(self, opts: step.CoZOptions, report: dict, padded: bool) -> list[str]:
        """The deliberate differences from the authors' step that this call made, each with its measured size."""
        notes = [DIFFERENCES["merged_lora"], DIFFERENCES[f"sampling_{opts.sampling}"]]
        if report.get("transformer_tiles", {}).get("count", 1) > 1:
            notes.append(DIFFERENCES["tiled"])
        if padded:
            notes.append(DIFFERENCES["padded"])
        if self.dtype != torch.float32 or self.vae_dtype != torch.float32:
            notes.append(DIFFERENCES["precision"])
        if self.text_dtype == torch.float32:
            notes.append(DIFFERENCES["text_fp32"])
        return notes

    def networks(self) -> dict:
        return {"transformer": dtype_name(self.dtype), "vae": dtype_name(self.vae_dtype),
                "clip_l": dtype_name(self.text_dtype), "clip_g": dtype_name(self.text_dtype),
                "t5": dtype_name(self.text_dtype) if self.comps.t5 is not None else None}

    def describe(self) -> dict:
        return {**self.source.describe(), "impl": Impl.DIFFUSION, "native_scale": self.scale, "files": self.files,
                "dtypes": self.networks()}

    @classmethod
    def load(cls, base: str | os.PathLike, transformer_lora: str | os.PathLike | None = None,
             vae_lora: str | os.PathLike | None = None, *,
             text_files: dict | None = None, tokenizer_dirs: TokenizerDirs = TokenizerDirs(), use_t5: bool = True,
             dtype: str = "auto", device: torch.device | None = None, residency: ResidencyFor | None = None,
             free_ram: int | None = None) -> "CoZSD3Upscaler":
        """SD3 medium (diffusers folder, or sd3_medium*.safetensors + text encoder files) + the two LoRA files.

        Before any tensor is read, what the load and a 512 px step need is compared with the free host memory
        (`free_ram`, default: what the OS and a container limit leave): dtype auto lowers the text encoders,
        then the transformer, to bf16 when fp32 does not fit; otherwise the load is refused (memory_plan.py)."""
        base = Path(base)
        if transformer_lora is None or vae_lora is None:
            raise UpscalerError(
                f"{base.name} is SD3 medium: as Chain-of-Zoom's super-resolver it needs the authors' two LoRA files "
                f"(transformer_lora {TRANSFORMER_LORA}, vae_lora {VAE_ENCODER_LORA}): in ComfyUI load it with 'Load "
                "Chain-of-Zoom Model'; in Python pass both files, load_upscaler(base, transformer_lora=..., "
                "vae_lora=...); on the command line, zoom --coz-model BASE (the files are looked up in "
                f"loras/{LORA_FOLDER}/ of the models root, or give --transformer-lora and --vae-lora)")
        device = device or default_device()
        dtypes, memory = select_dtypes(dtype, device), None
        if base.is_file() or is_sd3_folder(base):  # anything else is refused by name by the loaders below
            dtypes, memory = check_before_load(base, text_files, use_t5, dtypes, dtype, free_ram)
        main_dtype, vae_dtype, text_dtype = dtypes
        if base.is_dir():
            comps = load_diffusers_folder(base, tokenizer_dirs, use_t5, dtypes=(main_dtype, vae_dtype, text_dtype))
        elif base.is_file():
            comps = load_single_files(base, text_files or {}, tokenizer_dirs, use_t5,
                                     dtypes=(main_dtype, vae_dtype, text_dtype))
        else:
            raise UpscalerError(f"SD3 base model not found: {base}. Put sd3_medium*.safetensors in models/checkpoints "
                                "or the stable-diffusion-3-medium-diffusers folder in models/diffusers")
        for m in (comps.transformer, comps.vae, comps.clip_l, comps.clip_g, comps.t5):
            if m is not None:  # already in its compute dtype: no fp32 copy of a large text encoder on the way
                m.eval().requires_grad_(False)
        files = comps.files + [merge_transformer_lora(comps.transformer, transformer_lora),
                               merge_vae_encoder_lora(comps.vae, vae_lora)]
        source = ModelSource(base.name, files[0]["sha256"], ARCHITECTURE)
        model = cls(comps, source, files, main_dtype, vae_dtype, text_dtype, residency)
        model.load_memory = memory
        return model



def is_coz_base(path: str | os.PathLike) -> bool:
    from .single_file import is_sd3_checkpoint

    path = Path(path)
    return is_sd3_folder(path) if path.is_dir() else is_sd3_checkpoint(path)
