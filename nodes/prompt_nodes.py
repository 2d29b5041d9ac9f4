"""Prompt family: Load Prompt Model (a vision-language model in models/LLM), Load Tagger (RAM / DAPE tags
from models/RAM) and Prompt from Image. Both loaders give a PROMPT_MODEL the Chain-of-Zoom nodes take."""
from __future__ import annotations

from pathlib import Path

from ..imaging.image_io import to_pil
from ..runtime.dtypes import DTYPE_NAMES
from ..upscalers import UpscalerError
from ..zoom import derive_seed, make_prompt
from . import bridge
from .bridge import PROMPT_MODEL, PROMPT_MODEL_FOLDER, TAGGER_FOLDER, Choice, advanced, io, schema
from .shared_inputs import SEED_MAX, ZOOM_CATEGORY

ALIASES = ("prompt", "caption", "describe image", "vlm", "chain of zoom", "coz")
PROMPT_MODEL_TOOLTIP = "For Chain-of-Zoom nodes and Prompt from Image."
RAM_FILE, DAPE_FILE = "ram_swin_large_14m.pth", "DAPE.pth"
NO_DAPE = "none"
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


def dtype_input(tooltip: str) -> io.Input:
    return Choice("dtype", options=["auto", *DTYPE_NAMES], default="auto", tooltip=tooltip)


def prompt_model_output() -> list[io.Output]:
    return [PROMPT_MODEL.Output(display_name="prompt_model", tooltip=PROMPT_MODEL_TOOLTIP)]


class LoadPromptModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="DreamForgeLoadPromptModel", display_name="Load Prompt Model (DreamForge)", category=ZOOM_CATEGORY,
            description="Loads a vision-language model (transformers image-text-to-text, e.g. Qwen2.5-VL-3B-Instruct) "
                        f"from models/{PROMPT_MODEL_FOLDER}/<folder> to describe images for Chain-of-Zoom. Nothing is "
                        "downloaded.",
            aliases=ALIASES + ("qwen", "llm", "load model"),
            inputs=[
                Choice("model_name", options=bridge.prompt_model_names(),
                       tooltip=f"A folder in models/{PROMPT_MODEL_FOLDER} with config.json, weights and processor "
                               "files."),
                dtype_input("auto: bf16 (or fp16) on CUDA, fp32 on CPU."),
                io.Int.Input("max_new_tokens", default=32, min=1, max=1024,
                             tooltip="Longest description in tokens (published: 32)."),
                io.Float.Input("temperature", default=0.0, min=0.0, max=2.0, step=0.05,
                               tooltip="0 = greedy, deterministic; above 0 samples with the step's seed."),
            ],
            outputs=prompt_model_output(),
        )

    @classmethod
    def execute(cls, model_name, dtype, max_new_tokens, temperature) -> io.NodeOutput:
        from ..zoom.vlm import VLMPromptProvider, pick_dtype  # transformers' VLM classes: only when one is loaded

        provider = VLMPromptProvider.load(bridge.prompt_model_path(model_name),
                                          dtype=pick_dtype(dtype, bridge.device()),
                                          device=bridge.offload_device(), max_new_tokens=max_new_tokens,
                                          temperature=temperature)
        return io.NodeOutput(bridge.PromptModelHandle.of(provider))


def _tagger_files() -> list[str]:
    return [n for n in bridge.filenames(TAGGER_FOLDER) if n.lower().endswith(WEIGHT_SUFFIXES)]


def _preferred(names: list[str], wanted: str) -> list[str]:
    """The published file name first, so a fresh node picks it."""
    return sorted(names, key=lambda n: (Path(n).name != wanted, n))


def _tagger_path(name: str, what: str) -> Path:
    path = bridge.find_file(TAGGER_FOLDER, name)
    if path is None:
        raise UpscalerError(f"{what}: {name!r} not found in models/{TAGGER_FOLDER}; put {RAM_FILE} (and {DAPE_FILE}) "
                            "there and refresh")
    return path


class LoadTagger(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        files = _tagger_files()
        return schema(
            node_id="DreamForgeLoadTagger", display_name="Load Tagger (DreamForge)", category=ZOOM_CATEGORY,
            description=f"Loads Recognize Anything (RAM Swin-L, {RAM_FILE}) from models/{TAGGER_FOLDER}, with "
                        f"Chain-of-Zoom's DAPE LoRA ({DAPE_FILE}) merged in, as a prompt model: each view's tags "
                        "become its prompt ('tag, tag, ..., your prompt,'), the reference code's default. Weights-only "
                        "loading, nothing downloaded.",
            aliases=ALIASES + ("ram", "dape", "recognize anything", "tagger", "tags"),
            inputs=[
                Choice("ram_model", options=_preferred(files, RAM_FILE),
                       tooltip=f"RAM checkpoint in models/{TAGGER_FOLDER} ({RAM_FILE}, 5.6 GB; only the ~0.8 GB it "
                               "needs is read)."),
                Choice("dape", options=[NO_DAPE] + _preferred(files, DAPE_FILE),
                       default=DAPE_FILE if any(Path(f).name == DAPE_FILE for f in files) else NO_DAPE,
                       tooltip=f"DAPE LoRA ({DAPE_FILE}, tuned for degraded images), merged at load; 'none' = "
                               "plain RAM."),
                io.Int.Input("max_tags", default=0, min=0, max=256,
                             tooltip="0 = every tag that fires; else the most probable ones (still listed in "
                                     "tag-list order)."),
                io.String.Input("drop_tags", default="", multiline=False,
                                tooltip="Tags never to use, comma-separated (names from RAM's tag list)."),
                io.String.Input("keep_tags", default="", multiline=False,
                                tooltip="Tags always to use, comma-separated (names from RAM's tag list)."),
                advanced(io.Float.Input("threshold_offset", default=0.0, min=-0.5, max=0.5, step=0.01,
                                        tooltip="Added to every tag's own threshold: negative = more tags. Tags RAM "
                                                "switches off stay off.")),
                dtype_input("auto: fp16 on CUDA (as the reference), fp32 on the CPU."),
            ],
            outputs=prompt_model_output(),
        )

    @classmethod
    def execute(cls, ram_model, dape, max_tags, drop_tags, keep_tags, threshold_offset, dtype) -> io.NodeOutput:
        from ..zoom.tagger import TaggerProvider, tagger_dtype  # timm's Swin-L: only when a tagger is loaded

        ram_path = _tagger_path(ram_model, "ram_model")
        dape_path = None if dape == NO_DAPE else _tagger_path(dape, "dape")
        if dape_path is not None and dape_path.resolve() == ram_path.resolve():
            raise UpscalerError(f"dape: {dape} is the RAM checkpoint itself; choose {DAPE_FILE} or 'none'")
        provider = TaggerProvider.load(ram_path, dape_path, dtype=tagger_dtype(dtype, bridge.device()),
                                       max_tags=max_tags, drop_tags=drop_tags, keep_tags=keep_tags,
                                       threshold_offset=threshold_offset)
        return io.NodeOutput(bridge.PromptModelHandle.of(provider))


class _Generation:
    """A prompt model with this node's generation settings (the loader's stay the default elsewhere)."""

    def __init__(self, handle: bridge.PromptModelHandle, max_new_tokens: int, temperature: float):
        self.handle, self.max_new_tokens, self.temperature = handle, max_new_tokens, temperature
        self.name = handle.name

    def describe(self, images, instruction, *, seed=None, check_interrupt=None):
        return self.handle.describe(images, instruction, seed=seed, check_interrupt=check_interrupt,
                                    max_new_tokens=self.max_new_tokens, temperature=self.temperature)


class PromptFromImage(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="DreamForgePromptFromImage", display_name="Prompt from Image (DreamForge)", category=ZOOM_CATEGORY,
            description="Describes an image with a prompt model, as Chain-of-Zoom does: one image with 'What is in "
                        "this image? Give me a set of words.', or a context image plus its zoom-in with the two-image "
                        "instruction.",
            aliases=ALIASES + ("image to prompt", "interrogate"),
            inputs=[
                PROMPT_MODEL.Input("prompt_model", tooltip="From Load Prompt Model."),
                io.Image.Input("image", tooltip="The image (or, with 'zoom', the context it was zoomed from)."),
                io.Int.Input("max_new_tokens", default=32, min=1, max=1024,
                             tooltip="Longest answer in tokens (a set of words needs ~32)."),
                io.Float.Input("temperature", default=0.0, min=0.0, max=2.0, step=0.05,
                               tooltip="0 = greedy, deterministic."),
                io.Int.Input("seed", default=0, min=0, max=SEED_MAX, tooltip="Sampling seed (used when temperature > 0)."),
                io.Image.Input("zoom", optional=True,
                               tooltip="A zoom-in of 'image': the two-image (multi-scale) instruction is used."),
            ],
            outputs=[io.String.Output(display_name="text", tooltip="The generated description.")],
        )

    @classmethod
    def execute(cls, prompt_model, image, max_new_tokens, temperature, seed, zoom=None) -> io.NodeOutput:
        handle = bridge.as_prompt_model(prompt_model)
        if handle is None:
            raise UpscalerError("prompt_model is required: connect 'Load Prompt Model (DreamForge)'")
        if zoom is not None and zoom.shape[0] not in (1, image.shape[0]):
            raise UpscalerError(f"zoom has {zoom.shape[0]} images; connect 1 or as many as image ({image.shape[0]})")
        generation = _Generation(handle, max_new_tokens, temperature)
        texts = []
        for i in range(image.shape[0]):
            images = [to_pil(image[i])]
            if zoom is not None:
                images.append(to_pil(zoom[min(i, zoom.shape[0] - 1)]))
            text, _ = make_prompt(generation, images, "", seed=derive_seed(seed, i),
                                  check_interrupt=bridge.check_interrupt)
            texts.append(text)
        return io.NodeOutput("\n".join(texts))


NODES = [LoadPromptModel, PromptFromImage, LoadTagger]
