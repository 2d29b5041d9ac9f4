"""Upscale family: Load Upscaler, ESRGAN Upscale, Tiled Upscale, SDX4 Upscale, Load Chain-of-Zoom Model.

Thin V3 nodes: schema -> a backend call (upscalers/) with ComfyUI's hooks from the bridge -> outputs.
The tiling inputs and the SD x4 inputs are built here, once.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..runtime.dtypes import DTYPE_NAMES
from ..upscalers import IMPLS, GANUpscaler, UpscaleRequest, UpscalerError, upscale
from ..upscalers.contract import Impl
from ..upscalers.coz_sd3 import (
    LORA_FOLDER, TRANSFORMER_LORA, VAE_ENCODER_LORA, CoZOptions, CoZSD3Upscaler, TokenizerDirs,
)
from ..upscalers.coz_sd3.components import is_sd3_folder
from ..upscalers.coz_sd3.single_file import is_sd3_checkpoint
from ..upscalers.coz_sd3.step import SAMPLING as COZ_SAMPLING
from ..upscalers.impl_policy import choose_run, overlap_for, strict_scale_error
from ..upscalers.receipts import Policy
from ..upscalers.sdx4 import DEFAULT_PROMPT, SDX4Options, is_sdx4_file, is_sdx4_folder
from . import bridge
from .bridge import UPSCALER, Choice, advanced, io, schema
from .shared_inputs import CATEGORY, SEED_MAX, ZOOM_CATEGORY, overlap_input, tiling_inputs, upscaler_input

SD_X4_ONLY, DIFFUSION_ONLY = "SD x4 only:", "SD x4 and Chain-of-Zoom's model only:"
# Tiled Upscale's tooltips for the diffusion inputs (a GAN run ignores every one of them): what applies first.
TILED_DIFFUSION_TOOLTIPS = {
    "prompt": f"{DIFFUSION_ONLY} what the image shows / should look like. A GAN ignores it.",
    "negative_prompt": f"{SD_X4_ONLY} what to steer away from, e.g. 'blurry, jpeg artifacts'.",
    "seed": f"{DIFFUSION_ONLY} the noise seed (the same seed gives the same image on the same device). A GAN "
            "ignores it, so its control starts at 'fixed' (DreamForge's web extension): an unchanged re-queue is "
            "served from ComfyUI's cache instead of rerunning.",
    "steps": f"{SD_X4_ONLY} DDIM denoising steps (not a zoom depth). 20-30 is faster, 50 is the quality default.",
    "noise_level": f"{SD_X4_ONLY} noise added to the low-res input: higher invents more detail, lower stays closer "
                   "to the input. ComfyUI's noise_augmentation x 350.",
}


def diffusion_inputs(optional: bool = False) -> list[io.Input]:
    """The SD x4 settings (Tiled Upscale takes them as optional inputs, SDX4 Upscale as required). On Tiled
    Upscale each tooltip begins with the models it applies to and the input is advanced (newer frontends fold
    it away): a GAN run ignores all of them."""
    inputs = [
        io.String.Input("prompt", default=DEFAULT_PROMPT, multiline=True, optional=optional,
                        tooltip="What the image shows / should look like (SD x4 only; GANs ignore it)."),
        io.String.Input("negative_prompt", default="", multiline=True, optional=optional,
                        tooltip="What to steer away from, e.g. 'blurry, jpeg artifacts' (SD x4 only)."),
        io.Int.Input("seed", default=0, min=0, max=SEED_MAX, control_after_generate=True, optional=optional,
                     tooltip="Noise seed (SD x4): the same seed gives the same image on the same device."),
        io.Int.Input("steps", default=50, min=1, max=1000, optional=optional,
                     tooltip="DDIM denoising steps (SD x4). 20-30 is faster, 50 is the quality default."),
        io.Float.Input("guidance", default=7.5, min=0.0, max=30.0, step=0.1, round=0.01, optional=optional,
                       tooltip="Classifier-free guidance (SD x4); 1 or less turns it off: one UNet batch per step "
                               "instead of two (not timed)."),
        io.Int.Input("noise_level", default=20, min=0, max=350, optional=optional,
                     tooltip="Noise added to the low-res input (SD x4): higher invents more detail, lower stays "
                             "closer to the input. ComfyUI's noise_augmentation x 350."),
    ]
    if optional:
        for spec in inputs:
            spec.tooltip = TILED_DIFFUSION_TOOLTIPS.get(spec.id) or f"{SD_X4_ONLY} {spec.tooltip}"
            advanced(spec)
    return inputs


def image_and_receipt(image_tooltip: str, receipt_tooltip: str) -> list[io.Output]:
    return [io.Image.Output(display_name="image", tooltip=image_tooltip),
            io.String.Output(display_name="receipt", tooltip=receipt_tooltip)]


def run_upscale(handle: bridge.UpscalerHandle, image, request: UpscaleRequest) -> io.NodeOutput:
    """Run the handle's upscaler with ComfyUI's hooks. The GAN a diffusion run may fall back to comes from the
    model folders; which fallbacks apply the driver decides from what the node's request allows. A degraded
    result is also reported to the UI / API client (`dreamforge_degraded`) besides the receipt and the log."""
    out, receipt = upscale(handle.upscaler, image, request, device=bridge.device(), hooks=bridge.run_hooks(handle),
                           gan=bridge.gan_fallback)
    ui = {"dreamforge_degraded": [receipt.to_dict()["degraded"]]} if receipt.degraded else None
    return io.NodeOutput(bridge.to_output(out), receipt.to_json(), ui=ui)


class LoadUpscaler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        # checkpoints: .safetensors headers only (a .ckpt would have to be unpickled to be recognised)
        sdx4 = bridge.prefixed_model_names(is_sdx4_folder, lambda f: f.lower().endswith(".safetensors")
                                           and is_sdx4_file(f))
        return schema(
            node_id="DreamForgeLoadUpscaler", display_name="Load Upscaler (DreamForge)", category=CATEGORY,
            description="Loads an upscaler: a GAN from models/upscale_models (any single-image model spandrel "
                        "loads: Real-ESRGAN, Compact, SwinIR, HAT, DAT...; ships with realesr-animevideov3), or "
                        "the Stable Diffusion x4 upscaler (a diffusers folder in models/diffusers, or "
                        "x4-upscaler-ema.safetensors in models/checkpoints or models/upscale_models), fully offline.",
            aliases=("real-esrgan", "esrgan", "upscale model", "sd upscaler", "stable diffusion x4", "load model"),
            inputs=[
                Choice("model_name", options=bridge.upscale_model_names() + sdx4,
                       tooltip="A GAN file in models/upscale_models (or the local mirror / runtime cache), "
                               "'diffusers/<folder>' for an SD x4 diffusers folder, or "
                               "'checkpoints/<file>' for the SD x4 single file."),
                Choice("impl", options=list(IMPLS), default="auto",
                       tooltip="A check, not a policy: auto loads whatever the file is; gan / diffusion insist on "
                               "that kind (an error says so when the file is the other kind). Which model runs is "
                               "Tiled Upscale's impl."),
                Choice("dtype", options=["auto", *DTYPE_NAMES], default="auto",
                       tooltip="auto: fp16 on CUDA where the model allows (SD x4: UNet fp16, VAE bf16/fp32), fp32 "
                               "on the CPU."),
                advanced(io.Boolean.Input("attention_slicing", default=False, optional=True,
                                          tooltip="SD x4: compute attention in slices (less VRAM, slower).")),
                advanced(io.Boolean.Input("cpu_offload", default=False, optional=True,
                                          tooltip="SD x4: keep only the network in use (text encoder, UNet, VAE) "
                                                  "on the GPU; the others wait in system RAM.")),
            ],
            outputs=[
                UPSCALER.Output(display_name="upscaler", tooltip="For DreamForge upscale nodes."),
                io.UpscaleModel.Output(display_name="upscale_model",
                                       tooltip="For ComfyUI's 'Upscale Image (using Model)' (GAN models only; "
                                               "empty for SD x4)."),
            ],
        )

    @classmethod
    def execute(cls, model_name, impl, dtype, attention_slicing=False, cpu_offload=False) -> io.NodeOutput:
        handle = bridge.load_handle(bridge.upscaler_path(model_name), impl, dtype, attention_slicing, cpu_offload)
        gan = handle.upscaler.descriptor if isinstance(handle.upscaler, GANUpscaler) else None
        return io.NodeOutput(handle, gan)


class ESRGANUpscale(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="DreamForgeESRGANUpscale", display_name="ESRGAN Upscale (DreamForge)", category=CATEGORY,
            description="Upscales with a GAN model, tiled and seam-free, to any scale (native passes, then an exact "
                        "antialiased resample). Takes our UPSCALER or ComfyUI's UPSCALE_MODEL.",
            aliases=("real-esrgan", "esrgan", "gan upscale", "4x", "2x", "upscale image", "tiled upscale"),
            inputs=[
                io.Image.Input("image", tooltip="The image(s) to upscale: RGB, RGBA (alpha kept) or grey; "
                                                "batches work."),
                upscaler_input("upscale_model", "From Load Upscaler or Load Upscale Model."),
                io.Float.Input("scale", default=0.0, min=0.0, max=16.0, step=0.05,
                               tooltip="Output/input size ratio. 0 = the model's native scale."),
                *tiling_inputs(),
            ],
            outputs=image_and_receipt("The upscaled image.",
                                      "JSON: what ran (model, sha256, tiles, retries, seconds)."),
        )

    @classmethod
    def execute(cls, image, upscale_model, scale, tile, overlap, resample) -> io.NodeOutput:
        handle = bridge.as_handle(upscale_model)
        if handle.upscaler.capabilities.impl is not Impl.GAN:
            raise UpscalerError("ESRGAN Upscale runs GAN models, but upscale_model is the Stable Diffusion x4 upscaler: "
                                "connect it to 'SDX4 Upscale (DreamForge)' or 'Tiled Upscale (DreamForge)' instead")
        return run_upscale(handle, image, UpscaleRequest(scale=scale or None, tile=tile,
                                                         overlap=overlap_for(Impl.GAN, overlap), resample=resample))


def _sdx4_options(steps, guidance, noise_level, negative_prompt, tile=0, overlap=32, vae_tile=0) -> SDX4Options:
    return SDX4Options(steps=steps, guidance=guidance, noise_level=noise_level, negative_prompt=negative_prompt,
                       tile=tile, overlap=overlap, vae_tile=vae_tile)


class TiledUpscale(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="DreamForgeTiledUpscale", display_name="Tiled Upscale (DreamForge)", category=CATEGORY,
            description="Tiled upscaler over any upscaler (ours or core's UPSCALE_MODEL) with an implementation "
                        "policy: the connected model runs, except that with the SD x4 model connected auto runs a "
                        "GAN from models/upscale_models below 3x; strict_scale refuses scales the model cannot reach "
                        "without resampling. Out of memory: smaller tiles, then (unless strict) GAN, then Lanczos.",
            aliases=("tiled upscale", "ultimate upscale", "sd upscaler", "real-esrgan", "esrgan", "4x", "2x",
                     "seamless upscale"),
            inputs=[
                io.Image.Input("image", tooltip="The image(s) to upscale: RGB, RGBA (alpha kept) or grey; "
                                                "batches work."),
                upscaler_input("upscaler", "From Load Upscaler (a GAN, the SD x4 upscaler or Chain-of-Zoom's model) "
                                           "or core's Load Upscale Model (a GAN)."),
                Choice("impl", options=list(IMPLS), default=bridge.default_impl_choice(),
                       tooltip="Which model runs (a policy; Load Upscaler's impl only checks the file's kind). A "
                               "connected GAN always runs, at any scale (to run RealESRGAN_x2plus at 2x, connect "
                               "it). With SD x4 connected: auto runs a GAN from models/upscale_models below 3x "
                               "(RealESRGAN_x2plus when installed, else a 4x GAN, else the bundled one) and SD x4 "
                               "from 3x; gan always runs that GAN; diffusion runs SD x4 (scale 2 = x4, then "
                               "downsample) and refuses a GAN. Default: DREAMFORGE_DEFAULT_IMPL, else auto."),
                io.Float.Input("scale", default=4.0, min=0.0, max=16.0, step=0.05,
                               tooltip="Output/input size ratio; exact output size round(W*s) x round(H*s). 0 = the "
                                       "connected model's native scale, as on ESRGAN Upscale."),
                io.Boolean.Input("strict_scale", default=False,
                                 tooltip="Refuse scales the model cannot produce natively (no resampling), and no "
                                         "fallback to another method on out-of-memory."),
                *tiling_inputs(),
                *diffusion_inputs(optional=True),
                advanced(Choice("sampling", options=list(COZ_SAMPLING), default="sample", optional=True,
                                tooltip="Chain-of-Zoom's own model only: sample = the paper's posterior sample (noise "
                                        "from the seed); mean = the posterior mean, no noise. SD x4 and GANs ignore "
                                        "it.")),
            ],
            outputs=image_and_receipt("The upscaled image.",
                                      "JSON: what ran (impl, model, tiles, retries, fallbacks, seed)."),
        )

    @classmethod
    def validate_inputs(cls, impl=None, scale=None, strict_scale=None):
        # Queue time (ComfyUI answers /prompt with HTTP 400). Naming these inputs switches ComfyUI's own
        # range and choice checks off for them, so the schema's are repeated first; every problem is listed.
        problems = bridge.declared_input_errors(cls, {"impl": impl, "scale": scale, "strict_scale": strict_scale})
        if strict_scale is True and impl is not None and scale is not None and not problems:
            if error := strict_scale_error(impl, scale):
                problems["strict_scale"] = error
        return "; ".join(problems.values()) or True

    @classmethod
    def execute(cls, image, upscaler, impl, scale, strict_scale, tile, overlap, resample, prompt=DEFAULT_PROMPT,
                negative_prompt="", seed=0, steps=50, guidance=7.5, noise_level=20, sampling="sample") -> io.NodeOutput:
        handle = bridge.as_handle(upscaler)
        choice = choose_run(impl, scale, handle.upscaler.capabilities.impl)
        if strict_scale and (error := strict_scale_error(choice.impl, scale)):
            raise UpscalerError(error)
        chosen = handle if choice.use_loaded else bridge.folder_gan(choice.gan_scale)
        gan_overlap = overlap_for(Impl.GAN, overlap)  # also the GAN fallback's, on a diffusion run
        overlap = overlap_for(choice.impl, overlap)
        request = UpscaleRequest(scale=scale, tile=tile, overlap=gan_overlap, resample=resample, strict_scale=strict_scale,
                                 policy=Policy(impl, choice.impl, choice.reason), fallbacks=("gan", "resize"))
        if choice.impl is Impl.DIFFUSION and isinstance(chosen.upscaler, CoZSD3Upscaler):
            # one step, no guidance: the user's tile and overlap (input px) become its latent px (half; the
            # receipt says both)
            options = CoZOptions.from_input_px(tile, overlap, sampling=sampling)
            return run_upscale(chosen, image, replace(request, prompt=prompt, seed=seed, options=options))
        if choice.impl is Impl.DIFFUSION:
            # the latent is the input's size, so the user's tile and overlap are the UNet's latent tiles
            options = _sdx4_options(steps, guidance, noise_level, negative_prompt, tile=tile, overlap=overlap)
            return run_upscale(chosen, image, replace(request, prompt=prompt, seed=seed, options=options))
        return run_upscale(chosen, image, request)


class SDX4Upscale(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="DreamForgeSDX4Upscale", display_name="SDX4 Upscale (DreamForge)", category=CATEGORY,
            description="Stable Diffusion x4 upscaler: prompt-guided 4x with latent-tiled denoising (one coherent "
                        "image, no seams) and a tiled 4x VAE decode that keeps one tone across tiles. Out of memory: "
                        "smaller tiles, then a GAN, then Lanczos (the receipt lists each step).",
            aliases=("sd upscaler", "stable diffusion x4", "sd x4", "x4 upscaler", "4x", "diffusion upscale"),
            inputs=[
                io.Image.Input("image", tooltip="The image(s) to upscale 4x (the latent is this size: 512 px -> "
                                                "2048 px)."),
                UPSCALER.Input("upscaler", tooltip="The SD x4 upscaler from Load Upscaler (impl diffusion or auto)."),
                *diffusion_inputs(),
                io.Int.Input("tile", default=0, min=0, max=4096, step=8,
                             tooltip="UNet tile side in input pixels (the latent is the input's size). 0 = auto: "
                                     "untiled when it fits free memory."),
                overlap_input(max_value=256),
                advanced(io.Int.Input("vae_tile", default=0, min=0, max=4096, step=8,
                                      tooltip="Decode tile side in input pixels. 0 = auto (at most 224 + padding, so "
                                              "the decoder's attention never sees a large latent at once).")),
            ],
            outputs=image_and_receipt("The 4x image.", "JSON: model, seed, steps, tiles, retries, fallbacks, seconds."),
        )

    @classmethod
    def execute(cls, image, upscaler, prompt, negative_prompt, seed, steps, guidance, noise_level, tile, overlap,
                vae_tile) -> io.NodeOutput:
        handle = bridge.as_handle(upscaler)
        if handle.upscaler.capabilities.impl is not Impl.DIFFUSION:
            raise UpscalerError(
                "SDX4 Upscale needs the Stable Diffusion x4 upscaler, but the connected upscaler is a GAN "
                f"({handle.upscaler.source.file}); load x4-upscaler-ema.safetensors or its diffusers folder with "
                "'Load Upscaler' (impl diffusion), or use 'ESRGAN Upscale' / 'Tiled Upscale' for GANs."
            )
        options = _sdx4_options(steps, guidance, noise_level, negative_prompt, tile, overlap_for(Impl.DIFFUSION, overlap),
                                vae_tile)
        # the request's overlap is the GAN fallback's: SD x4 itself takes its tiles from the options
        return run_upscale(handle, image, UpscaleRequest(scale=4, overlap=overlap_for(Impl.GAN, overlap), prompt=prompt,
                                                         seed=seed, options=options, fallbacks=("gan", "resize")))


FROM_CHECKPOINT = "(from checkpoint)"
NO_T5 = "none (no T5)"


def _lora_choices(wanted: str) -> list[str]:
    # the authors' file names first (models/loras/chain-of-zoom/ by convention), then any other file
    return sorted(bridge.filenames("loras"), key=lambda n: (Path(n).name != wanted,
                                                            not n.startswith(LORA_FOLDER + "/"), n))


def _text_encoder_path(name: str) -> str | None:
    return None if name in (FROM_CHECKPOINT, NO_T5) else str(bridge.full_path("text_encoders", name))


class LoadCoZModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        text = bridge.filenames("text_encoders")
        return schema(
            node_id="DreamForgeLoadCoZModel", display_name="Load Chain-of-Zoom Model (DreamForge)",
            category=ZOOM_CATEGORY,
            description="Loads Chain-of-Zoom's own super-resolver: Stable Diffusion 3 medium with the authors' LoRA "
                        f"(models/loras/{LORA_FOLDER}/{TRANSFORMER_LORA} and {VAE_ENCODER_LORA}), merged at load. "
                        "A 4x upscaler (bicubic 4x, then one SR step) for the Chain-of-Zoom nodes and Tiled Upscale. "
                        "Offline; weights only.",
            aliases=("chain of zoom", "coz", "sd3 upscaler", "extreme zoom", "load model"),
            inputs=[
                Choice("base_model", options=bridge.prefixed_model_names(is_sd3_folder, is_sd3_checkpoint),
                       tooltip="SD3 medium: 'diffusers/<folder>' (models/diffusers) or "
                               "'checkpoints/sd3_medium*.safetensors' (models/checkpoints)."),
                Choice("transformer_lora", options=_lora_choices(TRANSFORMER_LORA),
                       tooltip=f"The authors' SR_LoRA/{TRANSFORMER_LORA} (put it in models/loras/{LORA_FOLDER}/)."),
                Choice("vae_lora", options=_lora_choices(VAE_ENCODER_LORA),
                       tooltip=f"The authors' SR_VAE/{VAE_ENCODER_LORA} (put it in models/loras/{LORA_FOLDER}/)."),
                Choice("clip_l", options=[FROM_CHECKPOINT, *text],
                       tooltip="clip_l.safetensors when the checkpoint has no CLIP-L (models/text_encoders or "
                               "models/clip)."),
                Choice("clip_g", options=[FROM_CHECKPOINT, *text],
                       tooltip="clip_g.safetensors when the checkpoint has no CLIP-G."),
                Choice("t5xxl", options=[FROM_CHECKPOINT, NO_T5, *text],
                       tooltip="t5xxl_fp16 / fp8 file, or none: the prompt embedding then differs from the paper's "
                               "(noted in the receipt) and loading needs ~9 GB less."),
                Choice("dtype", options=["auto", *DTYPE_NAMES], default="auto",
                       tooltip="Transformer precision. auto: bf16 on CUDA (fp16 text encoders, fp32 VAE), fp32 on "
                               "the CPU. fp32 = the paper's."),
            ],
            outputs=[UPSCALER.Output(display_name="upscaler",
                                     tooltip="For Chain-of-Zoom Step / Loop / Upscale and Tiled Upscale.")],
        )

    @classmethod
    def execute(cls, base_model, transformer_lora, vae_lora, clip_l, clip_g, t5xxl, dtype) -> io.NodeOutput:
        base = bridge.prefixed_model_path(base_model, "base_model")
        if base is None:
            raise UpscalerError(f"base_model must be 'diffusers/<folder>' or 'checkpoints/<file>'; got {base_model!r}")
        text_files = {"clip_l": _text_encoder_path(clip_l), "clip_g": _text_encoder_path(clip_g),
                      "t5": _text_encoder_path(t5xxl)}
        upscaler = CoZSD3Upscaler.load(
            base, str(bridge.full_path("loras", transformer_lora)), str(bridge.full_path("loras", vae_lora)),
            text_files=text_files, tokenizer_dirs=TokenizerDirs(bridge.CLIP_TOKENIZER_DIR, bridge.T5_TOKENIZER_DIR),
            use_t5=t5xxl != NO_T5, dtype=dtype, device=bridge.device(), residency=bridge.residency)
        return io.NodeOutput(bridge.UpscalerHandle(upscaler, upscaler.residency.held[0]))


NODES = [LoadUpscaler, ESRGANUpscale, TiledUpscale, SDX4Upscale, LoadCoZModel]
