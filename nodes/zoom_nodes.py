"""Chain-of-Zoom family: Step, Loop and the full-image Upscale (backends in zoom/).

Progress moves per scale-state / pass; each state is also a preview frame when the server runs with
--preview-method (never otherwise: API clients collect streamed images as results).
"""
from __future__ import annotations

import torch

from ..imaging.image_io import from_pil, to_pil
from ..upscalers import UpscalerError
from ..upscalers.receipts import BatchReceipt
from ..zoom import (
    COLOR_FIX_CHOICES, DEFAULT_MAX_SIDE, DEFAULT_PROCESS_SIZE, MODES as ZOOM_MODES, SAMPLING_CHOICES, ZoomSettings,
    zoom_loop, zoom_step, zoom_upscale,
)
from . import bridge
from .bridge import PROMPT_MODEL, Choice, advanced, io, schema
from .shared_inputs import SEED_MAX, TILE_TOOLTIP, ZOOM_CATEGORY, tiling_inputs, upscaler_input

ALIASES = ("chain of zoom", "coz", "extreme zoom", "zoom in", "super resolution")
UPSCALER_TOOLTIP = "A 4x upscaler (SD x4, a 4x GAN, or Chain-of-Zoom's own model from Load Chain-of-Zoom Model)."
SAMPLING_TOOLTIP = ("Chain-of-Zoom's own model only: sample = the paper's posterior sample (noise from the seed); mean = "
                    "the posterior mean, no noise (deterministic, seed-independent). Other upscalers ignore it.")


def sampling_input() -> io.Input:
    # optional, last among the widgets: workflows saved before it existed load and run unchanged (sample)
    return Choice("sampling", options=list(SAMPLING_CHOICES), default="sample", optional=True,
                  tooltip=SAMPLING_TOOLTIP)


def prompt_model_input(tooltip: str) -> io.Input:
    return PROMPT_MODEL.Input("prompt_model", optional=True, tooltip=tooltip)


def zoom_inputs() -> dict[str, io.Input]:
    """The settings Step and Loop share (Upscale takes prompt, color_fix and seed from here), by name."""
    inputs = [
        Choice("mode", options=list(ZOOM_MODES), default="recursive_multiscale",
               tooltip="recursive: zoom into the previous state, prompt from the zoomed view. recursive_multiscale: "
                       "same, prompt from the previous state + the view. onestep: one SR call from x0 per state. "
                       "nearest/bicubic: baselines, no model."),
        io.Int.Input("process_size", default=DEFAULT_PROCESS_SIZE, min=64, max=4096, step=8,
                     tooltip="Side of every scale-state (the input's short side is resized to it, then "
                             "centre-cropped). Multiple of 8."),
        io.String.Input("prompt", default="", multiline=True,
                        tooltip="Your prompt. With a prompt model the prompt is '{generated}, {yours},'."),
        Choice("color_fix", options=list(COLOR_FIX_CHOICES), default="wavelet",
               tooltip="Colour fix of every state against its bicubic view (the published code defaults to none)."),
        io.Int.Input("seed", default=0, min=0, max=SEED_MAX,
                     tooltip="Each step derives its own seed from this (for diffusion upscalers, Chain-of-Zoom's "
                             "sampling and sampling prompt models). A GAN without a prompt model ignores it, so its "
                             "control starts at 'fixed' (DreamForge's web extension): an unchanged re-queue is "
                             "served from ComfyUI's cache."),
        io.Int.Input("tile", default=0, min=0, max=8192, step=8, tooltip=TILE_TOOLTIP),
        sampling_input(),
    ]
    return {i.id: i for i in inputs}


def zoom_outputs(image: str, image_tooltip: str, text: str, text_tooltip: str) -> list[io.Output]:
    return [io.Image.Output(display_name=image, tooltip=image_tooltip),
            io.String.Output(display_name=text, tooltip=text_tooltip),
            io.String.Output(display_name="receipt", tooltip="JSON receipt.")]


def _settings(handle: bridge.UpscalerHandle, mode, process_size, prompt, color_fix, seed, tile,
              prompt_model, sampling) -> ZoomSettings:
    # the node reports progress per state, so the backend's per-tile progress is off
    return ZoomSettings(mode=mode, process_size=process_size, user_prompt=prompt,
                        provider=bridge.as_prompt_model(prompt_model), color_fix=color_fix, seed=seed,
                        sampling=sampling, tile=tile, device=bridge.device(),
                        hooks=bridge.run_hooks(handle, progress=False))


class ChainOfZoomStep(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="DreamForgeCoZStep", display_name="Chain-of-Zoom Step (DreamForge)", category=ZOOM_CATEGORY,
            description="One Chain-of-Zoom scale-state transition: x_(n-1) -> x_n (4x deeper into the centre). Chain "
                        "Step nodes with step 1, 2, 3... to reproduce the Loop; onestep/nearest/bicubic also need x0 "
                        "as origin.",
            aliases=ALIASES + ("zoom step",),
            inputs=[
                io.Image.Input("state", tooltip="The previous scale-state x_(n-1) (for step 1: any image; it is "
                                                "prepared to process_size)."),
                upscaler_input("upscaler", UPSCALER_TOOLTIP),
                io.Int.Input("step", default=1, min=1, max=8,
                             tooltip="n: this node makes x_n (4**n times x0). Selects the seed, and the crop for "
                                     "onestep/nearest/bicubic."),
                *zoom_inputs().values(),
                io.Image.Input("origin", optional=True,
                               tooltip="x0, for onestep/nearest/bicubic (they crop x0 at every step)."),
                prompt_model_input("Describes each view (Load Prompt Model)."),
            ],
            outputs=zoom_outputs("state", "x_n, the next scale-state.", "prompt", "The prompt this step used."),
        )

    @classmethod
    def execute(cls, state, upscaler, step, mode, process_size, prompt, color_fix, seed, tile, sampling="sample",
                origin=None, prompt_model=None) -> io.NodeOutput:
        handle = bridge.as_handle(upscaler)
        settings = _settings(handle, mode, process_size, prompt, color_fix, seed, tile, prompt_model, sampling)
        count = state.shape[0]
        if origin is not None and origin.shape[0] not in (1, count):
            raise UpscalerError(f"origin has {origin.shape[0]} images; connect 1 or as many as state ({count})")
        progress = bridge.Progress()
        states, prompts, receipts = [], [], []
        for i in range(count):
            x0 = None if origin is None else to_pil(origin[min(i, origin.shape[0] - 1)])
            result = zoom_step(handle.upscaler, to_pil(state[i]), step, settings, origin=x0, index=i)
            states.append(from_pil(result.state))
            prompts.append(result.prompt)
            receipts.append(result.receipt)
            progress.update(i + 1, count, image=result.state)
        receipt = receipts[0] if count == 1 else BatchReceipt(items=receipts)
        return io.NodeOutput(bridge.to_output(torch.cat(states)), "\n".join(prompts), receipt.to_json())


class ChainOfZoomLoop(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="DreamForgeCoZLoop", display_name="Chain-of-Zoom Loop (DreamForge)", category=ZOOM_CATEGORY,
            description="Chain-of-Zoom extreme zoom: the image's centre enlarged 4x per step by the same 4x upscaler, "
                        "a prompt per scale-state. Returns every state (x0 = 1x, x1 = 4x, x2 = 16x...) as one batch.",
            aliases=ALIASES + ("zoom loop", "infinite zoom"),
            inputs=[
                io.Image.Input("image", tooltip="The starting image(s); each is prepared to process_size (x0)."),
                upscaler_input("upscaler", UPSCALER_TOOLTIP),
                io.Int.Input("steps", default=4, min=1, max=8,
                             tooltip="Zoom depth, not denoising steps: the number of 4x scale-states after x0 "
                                     "(4**steps zoom in all)."),
                *zoom_inputs().values(),
                prompt_model_input("Describes each view (Load Prompt Model)."),
            ],
            outputs=zoom_outputs("states", "x0..x_steps of each input image, in that order.", "prompts",
                                 "One line per step."),
        )

    @classmethod
    def execute(cls, image, upscaler, steps, mode, process_size, prompt, color_fix, seed, tile, sampling="sample",
                prompt_model=None) -> io.NodeOutput:
        handle = bridge.as_handle(upscaler)
        settings = _settings(handle, mode, process_size, prompt, color_fix, seed, tile, prompt_model, sampling)
        total = image.shape[0] * steps
        progress = bridge.Progress()
        result = zoom_loop(handle.upscaler, image, steps, settings,
                           on_state=lambda index, n, x: progress.update(index * steps + n, total, image=x))
        prompts = "\n".join(p for per_image in result.prompts for p in per_image)
        return io.NodeOutput(bridge.to_output(result.tensor()), prompts, result.receipt.to_json())


class ChainOfZoomUpscale(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        shared = zoom_inputs()
        return schema(
            node_id="DreamForgeCoZUpscale", display_name="Chain-of-Zoom Upscale (DreamForge)",
            category=ZOOM_CATEGORY,
            description="Chain-of-Zoom for the whole image at any scale (e.g. 2.5, 16): 4x passes of the tiled "
                        "upscaler with a prompt each (per tile with a prompt model), a colour fix per pass, then an "
                        "exact resize to round(W*scale) x round(H*scale).",
            aliases=ALIASES + ("arbitrary scale", "16x", "4x"),
            inputs=[
                io.Image.Input("image", tooltip="The image(s) to enlarge (RGBA keeps its alpha)."),
                upscaler_input("upscaler", UPSCALER_TOOLTIP),
                io.Float.Input("scale", default=4.0, min=1.0, max=256.0, step=0.05,
                               tooltip="Output/input size ratio, at least 1 (Chain-of-Zoom only enlarges; no 0 = "
                                       "native: any scale is 4x passes). ceil(log4 scale) 4x passes, then an exact "
                                       "resize to round(W*scale) x round(H*scale)."),
                shared["prompt"],
                Choice("color_fix", options=list(COLOR_FIX_CHOICES), default="wavelet",
                       tooltip="Per pass, against that pass's input."),
                shared["seed"],
                *tiling_inputs(),
                advanced(io.Int.Input("max_side", default=DEFAULT_MAX_SIDE, min=64, max=65536, step=64,
                                      tooltip="Refuse (before any work) an output whose longer side exceeds this, "
                                              "in output pixels. This node's own cap; each 4x pass is also held "
                                              "to DREAMFORGE_MAX_SIDE (16384 unless the operator sets it), the "
                                              "only cap of the other upscale nodes.")),
                io.Boolean.Input("tile_prompts", default=True,
                                 tooltip="With a prompt model: a prompt per tile (whole image + tile, multi-scale "
                                         "instruction); off: one prompt per pass."),
                sampling_input(),
                prompt_model_input("Describes the image / each tile (Load Prompt Model)."),
            ],
            outputs=[io.Image.Output(display_name="image", tooltip="round(W*scale) x round(H*scale)."),
                     io.String.Output(display_name="receipt", tooltip="JSON: passes, prompts, seeds, timings.")],
        )

    @classmethod
    def execute(cls, image, upscaler, scale, prompt, color_fix, seed, tile, overlap, resample, max_side, tile_prompts,
                sampling="sample", prompt_model=None) -> io.NodeOutput:
        handle = bridge.as_handle(upscaler)
        progress = bridge.Progress()
        out, receipt = zoom_upscale(
            handle.upscaler, image, scale, user_prompt=prompt, provider=bridge.as_prompt_model(prompt_model),
            tile_prompts=tile_prompts, color_fix=color_fix, seed=seed, sampling=sampling, tile=tile, overlap=overlap,
            resample=resample,
            max_side=max_side, device=bridge.device(), hooks=bridge.run_hooks(handle),
            on_pass=lambda p, total, current: progress.update(p, total, image=current),
        )
        return io.NodeOutput(bridge.to_output(out), receipt.to_json())


NODES = [ChainOfZoomStep, ChainOfZoomLoop, ChainOfZoomUpscale]
