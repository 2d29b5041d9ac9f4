"""The pack's example workflows: UI-format files in example_workflows/ (ComfyUI serves them as templates,
each with a same-named .jpg thumbnail) and their API-format twins in example_workflows/api/.

A UI file is named by its title ("Upscale 4x with the bundled GAN.json"): ComfyUI 0.3.75 and the newest
frontend both show a custom node's template under its file name, and nothing else they read can carry a
title (docs/templates.md). Its API twin keeps a short stable name (api/upscale_bundled_x4.json), which
the tests, the demo and users' scripts queue; `Example` ties the two together.

Shared by scripts/make_workflow_assets.py (which builds the UI files from the twins in the real
frontend and makes the thumbnails from real runs) and by the tests (tests/test_browser_ui.py,
tests/test_example_workflows.py).

The workflows load `example.png`, the picture every ComfyUI ships in its input folder (a drawing: what
the bundled anime / line-art model is for), so each opens and runs with nothing picked; the tests put
that very file (resized for speed, except where a test says so) into their servers' input folders.
The photo workflow names RealESRGAN_x4plus and carries its download link (`Example.models`); its
thumbnail is made on scikit-image's astronaut photo (`Example.thumbnail_input`).
The Chain-of-Zoom prompt workflow names `Qwen2.5-VL-3B-Instruct` in models/LLM, a model nobody can
download here: runs made here swap in a tiny random Qwen2-VL written offline (tests/tiny_vlm.py)
under TINY_VLM, the only change a run variant makes (see `run_variant`).
The SD x4 workflow names the diffusers folder a user has, `models/diffusers/stable-diffusion-x4-upscaler`
(what `scripts/dreamforge_assets.py prefetch` installs); real weights cannot be had here either, so the
runs made here put a tiny random SD x4 upscaler of the published architecture under that very name
(tests/tiny_sdx4.py; `install_inputs`): the workflow runs unchanged, and its thumbnail says the
weights were random.
The Chain-of-Zoom-with-its-own-model workflow names SD3 medium's diffusers folder
(`models/diffusers/stable-diffusion-3-medium-diffusers`) and the authors' two LoRA files in
`models/loras/chain-of-zoom/`; runs made here put a tiny random SD3 of the published architecture and
LoRA files in the published layouts under those very names (tests/tiny_sd3.py; `install_inputs`), and its
thumbnail is a diagram of what the workflow does and needs, not a picture from random weights.
"""
from __future__ import annotations

import copy
import json
import sys
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
UI_DIR = REPO_ROOT / "example_workflows"
API_DIR = UI_DIR / "api"
INPUT_IMAGE = "example.png"  # in every ComfyUI's input/ folder
TINY_VLM = "tiny-qwen2-vl"
SDX4_FOLDER = "stable-diffusion-x4-upscaler"  # in models/diffusers; listed as diffusers/<folder>
PROMPT_MODEL_LOADER = "DreamForgeLoadPromptModel"
COZ_SD3_FOLDER = "stable-diffusion-3-medium-diffusers"  # in models/diffusers; listed as diffusers/<folder>
COZ_LORA_FOLDER = "chain-of-zoom"  # in models/loras (upscalers/coz_sd3/lora.py LORA_FOLDER)
SAVE_WITH_RECEIPT = "DreamForgeSaveImage"
IMAGE_NODES = ("SaveImage", "PreviewImage", SAVE_WITH_RECEIPT)  # the nodes whose outputs are pictures


@dataclass(frozen=True)
class Example:
    """One UI workflow: its API twin's name (example_workflows/api/NAME.json: what the tests and the demo
    queue), its title (the UI file's name: ComfyUI shows the file name as the template's title), a one-line
    description (the note's first line and docs/templates.md), what it shows the user, and which output
    becomes the thumbnail."""

    name: str
    title: str
    description: str
    note: str
    thumbnail_node: str  # id of the image node (IMAGE_NODES) whose output makes the .jpg
    # "compare": the face, left half before (the input, or before_node's image), right half this output;
    # "grid": the output's first four images (x0..x3 of a zoom loop), 2 x 2;
    # "zoom_diagram": the input with the nested regions a zoom loop enlarges and `caption`;
    # "tile_diagram": the input with the latent tiles the SD x4 node denoises and `caption`
    # (the diagrams show no output pixels: those workflows run here on tiny random weights)
    thumbnail: str = "compare"
    before_node: str | None = None
    label: str = ""  # written on the thumbnail
    # the generator runs it on the astronaut's face at this size instead of the whole photo (a model
    # too slow on the CPU for 512 px; the tests run every example on the 128 px face anyway)
    input_side: int | None = None
    caption: tuple[str, ...] = ()  # lines written on a diagram thumbnail
    # what the run needs beyond ComfyUI and the pack (shown in docs/templates.md); () = needs nothing:
    # the test opens and runs it with ComfyUI's own example.png and the bundled model only
    needs: tuple[str, ...] = ()
    # (node id, catalogue name): the node carries properties.models for that file (name, URL, folder),
    # what the frontend reads to offer the download of a missing model
    models: tuple[tuple[str, str], ...] = ()
    thumbnail_input: str = "example"  # "example": ComfyUI's example.png; "photo": scikit-image's astronaut

    @property
    def ui_path(self) -> Path:
        return UI_DIR / f"{self.title}.json"

    @property
    def api_path(self) -> Path:
        return API_DIR / f"{self.name}.json"

    @property
    def thumbnail_path(self) -> Path:
        return UI_DIR / f"{self.title}.jpg"

    @property
    def full_note(self) -> str:
        """The note as the workflow carries it: the title as its heading, the description, then the details."""
        return "\n".join([f"## {self.title}", f"*{self.description}*", self.note])

    def api(self) -> dict:
        return json.loads(self.api_path.read_text())

    def ui(self) -> dict:
        return json.loads(self.ui_path.read_text())

    def properties_models(self) -> dict[str, list[dict]]:
        """{node id: properties.models} from the catalogue: the file's name, its direct URL and its folder."""
        try:
            from dreamforge_upscale.assets.catalog import CATALOG
        except ImportError:  # run as a script: the backends under their package name (scripts/pack_import.py)
            import pack_import

            pack_import.install()
            from dreamforge_upscale.assets.catalog import CATALOG
        out: dict[str, list[dict]] = {}
        for node_id, name in self.models:
            spec = CATALOG[name]
            out.setdefault(node_id, []).append({"name": spec.filename, "url": spec.url, "directory": spec.folder})
        return out


# A title is a file name that both ComfyUI 0.3.75's frontend (1.32.9) and the newest (1.58.x) show as the
# card's title unchanged; 1.32.9 also shows it as the description with "-" and "_" turned into spaces, so
# no "_". Characters that a URL, a CSS attribute selector or a Windows file name would mangle are left out.
TITLE_CHARS = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 ,.+-")
TITLE_MAX = 36  # what one line of a template card shows at the dialog's default width


def title_problems(title: str) -> list[str]:
    """Why `title` would not read well as a template file name on both frontends ([] when it does)."""
    problems = []
    bad = sorted(set(title) - TITLE_CHARS)
    if bad:
        problems.append(f"{title!r}: characters {bad} (use letters, digits, spaces and , . + -)")
    if len(title) > TITLE_MAX:
        problems.append(f"{title!r}: {len(title)} characters, more than the {TITLE_MAX} a card shows on one line")
    if title != title.strip() or "  " in title:
        problems.append(f"{title!r}: leading, trailing or double spaces")
    if title.lower() == "index":
        problems.append(f"{title!r}: newer ComfyUI reads index.json as metadata, not as a workflow")
    return problems


_LOAD = ("**Load Image** opens `example.png`, the drawing ComfyUI ships in its input folder, so the workflow "
         "runs as opened: pick your picture there (*choose file to upload*).")
_SAVE = ("**Save Image + Receipt** writes the receipt into the PNG (chunk `dreamforge_receipt`, beside the "
         "workflow; `receipt_file` also writes NAME.json); core Save Image works too, without it.")
_PHOTO_PREFETCH = ("`python scripts/dreamforge_assets.py prefetch --bundle upscalers --only RealESRGAN_x4plus "
                   "--models-root ComfyUI/models` (SHA-256 checked)")
SDX4_PREFETCH = ("`python scripts/dreamforge_assets.py prefetch --bundle upscalers --only stable-diffusion-x4-upscaler "
                 "--revision stabilityai/stable-diffusion-x4-upscaler=<commit> --models-root ComfyUI/models`")
EXAMPLES = [
    Example("upscale_bundled_x4", "Upscale 4x with the bundled GAN",
            "GAN 4x, then Color Fix; needs nothing: the bundled model, made for drawings, anime and line art.",
            "\n".join([
        _LOAD,
        "**Load Upscaler** ships with Real-ESRGAN `realesr-animevideov3` (2.4 MB, BSD-3): no download. It is made "
        "for drawings, anime and line art (it flattens photos: for a photo open *Upscale a photo 4x with x4plus*). "
        "Put more models (`.pth` / `.safetensors`: Real-ESRGAN x4plus, SwinIR, HAT, DAT...) in "
        "`models/upscale_models`.",
        "**ESRGAN Upscale**: `scale 0` = the model's native 4x; `tile 0` = auto (the largest tile that fits free "
        "memory, seam-free). **Color Fix** (wavelet) keeps the input's colours.",
        _SAVE,
    ]), thumbnail_node="5", label="GAN x4 + Color Fix"),
    Example("upscale_photo_x4plus", "Upscale a photo 4x with x4plus",
            "A photo 4x with Real-ESRGAN x4plus, then Color Fix; needs RealESRGAN_x4plus.pth (64 MB, see the note).",
            "\n".join([
        "**Step one, the model**: RealESRGAN_x4plus.pth (64 MB, BSD-3) in `models/upscale_models`. ComfyUI's "
        "missing-model dialog offers it with its link when you open this workflow; or run " + _PHOTO_PREFETCH +
        "; or download github.com/xinntao/Real-ESRGAN/releases/download/v0.1.0/RealESRGAN_x4plus.pth there. "
        "Then press R (refresh) so Load Upscaler lists it.",
        _LOAD + " Use a photo: this model is trained on photos.",
        "**ESRGAN Upscale**: native 4x, `tile 0` = auto (seam-free tiles that fit free memory); **Color Fix** "
        "(wavelet) keeps the input's colours.",
        _SAVE,
    ]), thumbnail_node="5", label="x4plus on a photo + Color Fix", needs=("RealESRGAN_x4plus.pth",),
        models=(("2", "RealESRGAN_x4plus"),), thumbnail_input="photo"),
    Example("tiled_upscale_2x", "Tiled Upscale 2x, any scale",
            "Tiled Upscale to exactly 2x with impl auto; needs nothing: the connected bundled GAN, then an exact resample.",
            "\n".join([
        _LOAD,
        "**Tiled Upscale** at any scale, exactly round(W·2) × round(H·2). `impl auto` runs the model you connect: "
        "here the bundled 4x GAN, one pass, then an exact antialiased resample (connect a 2x model such as "
        "RealESRGAN_x2plus to skip the resample). `strict_scale` refuses scales that need resampling. Tiles are "
        "equal, feathered and read with real context: no seams. The receipt says what ran and why.",
        _SAVE,
    ]), thumbnail_node="4", label="Tiled Upscale x2"),
    Example("tiled_upscale_4x", "Tiled Upscale 4x, GAN or SD x4",
            "Tiled Upscale at 4x with impl auto: the SD x4 upscaler when you load it, else the bundled GAN.",
            "\n".join([
        _LOAD,
        "**Tiled Upscale** at 4x. `impl auto` runs the Stable Diffusion x4 upscaler when Load Upscaler loaded "
        "it (prompt, seed, steps... apply), else the connected GAN at its native 4x (no resampling). `tile 0` "
        "picks the tile from free memory; on out-of-memory the tile is halved and the run restarted (each retry "
        "is in the receipt).",
        _SAVE,
    ]), thumbnail_node="4", label="Tiled Upscale x4"),
    Example("sdx4_tiled_4x", "SD x4 upscaler 4x with a prompt",
            "Prompt-guided 4x in latent tiles; needs the SD x4 upscaler in models/diffusers/stable-diffusion-x4-upscaler.",
            "\n".join([
        _LOAD,
        "**Load Upscaler**: the Stable Diffusion x4 upscaler (`impl diffusion`). Put the diffusers folder of "
        "`stabilityai/stable-diffusion-x4-upscaler` (CreativeML Open RAIL++-M) in "
        "`models/diffusers/stable-diffusion-x4-upscaler` (listed as `diffusers/stable-diffusion-x4-upscaler`): "
        + SDX4_PREFETCH + " puts it there, at the commit you name; or `x4-upscaler-ema.safetensors` in "
        "models/checkpoints (listed as `checkpoints/...`). Nothing is downloaded by the nodes.",
        "**SDX4 Upscale**: `prompt` describes the picture, `negative_prompt` what to avoid; 20 DDIM steps, guidance "
        "7.5, noise_level 20 (higher invents more detail, lower stays closer to the input), a fixed seed (same "
        "seed, same image). `tile 128` / `overlap 32` denoise the latent in equal tiles of at most 128 px "
        "(large tiles keep the prompt coherent; `tile 0` = auto, from free memory), blended with a cos² "
        "feather: no seams. `vae_tile 0` = auto decode tiles. The receipt lists tiles, seed, steps and time.",
        _SAVE,
        "*Thumbnail*: the latent tiles this workflow denoises, drawn on the input (a diagram: the SD x4 "
        "weights were not at hand where it was made).",
    ]), thumbnail_node="4", thumbnail="tile_diagram", label="SD x4 4x: latent tiles (diagram)", input_side=256,
        caption=("needs: SD x4 upscaler in", "models/diffusers/", SDX4_FOLDER), needs=(f"models/diffusers/{SDX4_FOLDER}",)),
    Example("coz_prompt_loop", "Chain-of-Zoom 256x with prompts",
            "Chain-of-Zoom Loop, 4 steps of 4x into the centre, prompts from a vision-language model in models/LLM.",
            "\n".join([
        _LOAD,
        "**Load Prompt Model** needs a vision-language model folder in `models/LLM/` (e.g. the whole "
        "`Qwen2.5-VL-3B-Instruct` folder; nothing is downloaded). **Prompt from Image** describes the picture; "
        "the **Loop** zooms 4x into the centre per step (x0..x4 = 1x..256x) with a prompt per step.",
        "With the bundled GAN the prompts are recorded but do not steer it; Chain-of-Zoom's own model uses them "
        "(*Chain-of-Zoom with SD3 and its LoRA*, which prompts with DAPE tags as the paper does).",
    ]), thumbnail_node="6", thumbnail="grid", label="Chain-of-Zoom 1x 4x 16x 64x", needs=("models/LLM/<VLM folder>",)),
    Example("coz_own_model", "Chain-of-Zoom with SD3 and its LoRA",
            "Chain-of-Zoom Loop as the paper runs it: SD3 medium, the authors' LoRA and DAPE tag prompts (see the note).",
            "\n\n".join([
        _LOAD,
        "**Load Chain-of-Zoom Model** loads the model the paper's results come from; nothing is downloaded. Put:",
        "1. **Stable Diffusion 3 medium** (gated: accept its licence on Hugging Face first, so no direct link "
        "here), either the whole `stabilityai/stable-diffusion-3-medium-diffusers` folder as `models/diffusers/"
        + COZ_SD3_FOLDER + "` (listed as `diffusers/" + COZ_SD3_FOLDER + "`; it has the text encoders), or a "
        "single file from `stabilityai/stable-diffusion-3-medium` in `models/checkpoints` (listed as "
        "`checkpoints/...`): `sd3_medium_incl_clips_t5xxlfp16.safetensors` has everything; with "
        "`sd3_medium.safetensors` also put `clip_l.safetensors`, `clip_g.safetensors` and `t5xxl_fp16.safetensors` "
        "in `models/text_encoders` (or `models/clip`) and pick them in clip_l / clip_g / t5xxl.",
        "2. **The Chain-of-Zoom LoRA** from github.com/bryanswkim/Chain-of-Zoom: `ckpt/SR_LoRA/model_20001.pkl` "
        "(~8 MB) and `ckpt/SR_VAE/vae_encoder_20001.pt` (~69 MB), both in `models/loras/" + COZ_LORA_FOLDER + "/`. "
        "They are loaded as weights only and merged at load.",
        "3. **DAPE tag prompts** (the paper's default): **Load Tagger** reads `ram_swin_large_14m.pth` (Recognize "
        "Anything, Hugging Face `xinyu1205/recognize_anything_model`, 5.6 GB) and `DAPE.pth` (the same GitHub "
        "repository's `ckpt/DAPE/`) from `models/RAM/`; each view's tags become its prompt, your `prompt` "
        "(empty here) is appended. Leave Load Tagger out for your prompt alone.",
        "`t5xxl none` loads ~9 GB less (the receipt notes the prompt then differs from the paper's). `dtype auto`: "
        "bf16 transformer on a GPU, fp32 (the paper's) on the CPU, lowered to bf16 when free memory is short.",
        "**Chain-of-Zoom Loop**: 4 steps of 4x into the centre (x0..x4 = 1x..256x) at 512 px, the paper's "
        "recursive_multiscale mode. Same seed, same images. The receipt lists files, hashes, dtypes, seeds, "
        "prompts and tiles.",
    ]), thumbnail_node="4", thumbnail="zoom_diagram", label="Chain-of-Zoom, own SD3 model",
        caption=("needs: SD3 medium", "+ Chain-of-Zoom LoRA", "+ RAM / DAPE tagger"),
        needs=(f"models/diffusers/{COZ_SD3_FOLDER}", f"models/loras/{COZ_LORA_FOLDER}/", "models/RAM/")),
    Example("coz_upscale_2_5x", "Chain-of-Zoom Upscale 2.5x",
            "Whole-image Chain-of-Zoom to exactly 2.5x with the bundled GAN; needs nothing.",
            "\n".join([
        _LOAD,
        "**Chain-of-Zoom Upscale**: ceil(log4 2.5) = 1 pass of the 4x upscaler over the whole image (tiled), "
        "a colour fix per pass, then one exact resize to round(W·2.5) × round(H·2.5). Connect a prompt model "
        "for a prompt per tile.",
        _SAVE,
    ]), thumbnail_node="4", label="Chain-of-Zoom x2.5"),
    Example("color_fix_after_gan", "Color Fix after a GAN upscale",
            "ComfyUI's own model upscale, then our Color Fix against the input; needs nothing.",
            "\n".join([
        _LOAD,
        "ComfyUI's own **Load Upscale Model** + **Upscale Image (using Model)** (the bundled model is listed "
        "there too), then **Color Fix (DreamForge)** against the input: wavelet keeps the GAN's detail and the "
        "input's low frequencies (colour); adain matches mean/std per channel. Compare before / after.",
    ]), thumbnail_node="5", before_node="6", label="Color Fix after GAN"),
]
BY_NAME = {e.name: e for e in EXAMPLES}
BY_TITLE = {e.title: e for e in EXAMPLES}


def ui_workflow_files() -> list[Path]:
    """Every UI-format workflow at the top of example_workflows/ (what ComfyUI lists as templates)."""
    return sorted(UI_DIR.glob("*.json"))


def api_twin_files() -> list[Path]:
    return sorted(API_DIR.glob("*.json"))


def example_of(ui_path: Path) -> Example:
    """The example a UI workflow file is (by its title); a file EXAMPLES does not list raises KeyError."""
    return BY_TITLE[Path(ui_path).stem]


# ------------------------------------------------------------------------------------- inputs
def shipped_example() -> Path:
    """ComfyUI's own input/example.png (768 x 768, a drawing), from the installed ComfyUI tree."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from comfy_headless import comfyui_dir

    return comfyui_dir() / "input" / INPUT_IMAGE


def example_picture(size: int | None = None):
    """ComfyUI's example.png as an RGB array; `size`: resized to size x size (the tests run on 128 px)."""
    import numpy as np
    from PIL import Image

    with Image.open(shipped_example()) as im:
        im = im.convert("RGB")
        if size is not None:
            im = im.resize((size, size), Image.Resampling.LANCZOS)
        return np.asarray(im)


def astronaut(size: int | None = None):
    """scikit-image's astronaut photo (512 x 512 RGB; the photo template's thumbnail); `size`: resized."""
    from PIL import Image
    from skimage import data

    img = data.astronaut()
    if size is None:
        return img
    import numpy as np

    return np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.LANCZOS))


def _tests_on_path() -> None:
    tests_dir = str(REPO_ROOT / "tests")
    if tests_dir not in sys.path:
        sys.path.insert(0, tests_dir)


TAGGER_FILES = ("ram_swin_large_14m.pth", "DAPE.pth")  # in models/RAM (nodes/prompt_nodes.py RAM_FILE, DAPE_FILE)


def install_inputs(server, *, image_size: int | None = None, prompt_model: bool = True, sdx4: bool = True,
                   coz_sd3: bool = True) -> None:
    """Put ComfyUI's example.png (as shipped, or resized to `image_size`) into the server's input folder,
    the tiny VLM into its models/LLM, a tiny random SD x4 upscaler into models/diffusers/SDX4_FOLDER and a
    tiny random SD3 + Chain-of-Zoom LoRA + RAM/DAPE tagger under the names coz_own_model loads (before the
    page's /object_info lists the folders; ComfyUI re-lists them on change)."""
    server.add_input_image(example_picture(image_size), INPUT_IMAGE)
    if prompt_model:
        folder = Path(server.base) / "models" / "LLM" / TINY_VLM
        if not (folder / "config.json").is_file():
            _tests_on_path()
            from tiny_vlm import save_tiny_vlm

            save_tiny_vlm(folder)
    if sdx4:
        install_tiny_sdx4(Path(server.base) / "models" / "diffusers" / SDX4_FOLDER)
    if coz_sd3:
        install_tiny_coz_sd3(Path(server.base) / "models")
        install_tiny_tagger(Path(server.base) / "models" / "RAM")


def install_tiny_tagger(folder: Path) -> None:
    """RAM + DAPE at the published layouts and tiny widths, random weights (tests/tiny_ram.py), as the
    image-independent tagger tests/test_comfyui_dape.py writes (same files, whichever comes first)."""
    ram, dape = (folder / name for name in TAGGER_FILES)
    if ram.is_file() and dape.is_file():
        return
    _tests_on_path()
    from tiny_ram import save_tiny_dape, save_tiny_ram

    save_tiny_ram(ram, image_weight=0.0, fc_bias=-20.0)
    save_tiny_dape(dape, ram)


def _install_folder(folder: Path, write) -> Path:
    """`write(path)` makes the folder beside and it is renamed into place, so a loader never lists a
    half-written folder. An existing folder is kept."""
    if folder.is_dir():
        return folder
    import shutil
    import tempfile

    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"tiny-{folder.name}-", dir=folder.parent.parent))  # not in the listed one
    try:
        write(staging / folder.name)
        (staging / folder.name).rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def install_tiny_sdx4(folder: Path) -> Path:
    """The SD x4 upscaler's diffusers folder, published architecture at tiny widths, random weights
    (tests/tiny_sdx4.py; ~60 MB, a few seconds)."""
    _tests_on_path()
    import tiny_sdx4

    return _install_folder(folder, lambda path: tiny_sdx4.write_diffusers_folder(path, seed=0))


def install_tiny_coz_sd3(models: Path) -> dict[str, Path]:
    """SD3 medium's diffusers folder and the two Chain-of-Zoom LoRA files, published architecture and
    layouts at tiny widths, random weights (tests/tiny_sd3.py; a few MB, seconds), under the names
    coz_own_model loads."""
    _tests_on_path()
    import tiny_sd3

    return {"base": _install_folder(models / "diffusers" / COZ_SD3_FOLDER, tiny_sd3.write_diffusers_folder),
            "loras": _install_folder(models / "loras" / COZ_LORA_FOLDER, tiny_sd3.write_lora_files)}


# ------------------------------------------------------------------------------------- API twins
def run_variant(api: dict) -> dict:
    """The API prompt as it runs here: prompt models swapped for the tiny offline VLM. Nothing else changes."""
    g = copy.deepcopy(api)
    for node in g.values():
        if node["class_type"] == PROMPT_MODEL_LOADER:
            node["inputs"]["model_name"] = TINY_VLM
    return g


def server_inputs(object_info: dict, class_type: str) -> set[str]:
    spec = object_info[class_type]["input"]
    return set(spec.get("required", {})) | set(spec.get("optional", {}))


def api_differences(made: dict, twin: dict, object_info: dict) -> list[str]:
    """Where an API prompt made by the frontend differs from the twin file (class, inputs the server
    declares, titles). Frontend-only widget inputs the server ignores (e.g. PreviewAny's 'preview') are
    left out. [] when they agree."""
    problems = []
    if set(made) != set(twin):
        problems.append(f"node ids differ: frontend {sorted(made, key=int)} vs twin {sorted(twin, key=int)}")
    for node_id in sorted(set(made) & set(twin), key=int):
        a, b = made[node_id], twin[node_id]
        if a["class_type"] != b["class_type"]:
            problems.append(f"node {node_id}: class {a['class_type']} vs {b['class_type']}")
            continue
        known = server_inputs(object_info, a["class_type"])
        ia = {k: v for k, v in a["inputs"].items() if k in known}
        ib = {k: v for k, v in b["inputs"].items() if k in known}
        for key in sorted(set(ia) | set(ib)):
            if ia.get(key, "<absent>") != ib.get(key, "<absent>"):
                problems.append(f"node {node_id} ({a['class_type']}).{key}: frontend {ia.get(key, '<absent>')!r} "
                                f"vs twin {ib.get(key, '<absent>')!r}")
        extra = set(b["inputs"]) - known
        if extra:
            problems.append(f"node {node_id} ({b['class_type']}): twin has inputs the server does not know: {sorted(extra)}")
        ta, tb = a.get("_meta", {}).get("title"), b.get("_meta", {}).get("title")
        if tb and ta != tb:
            problems.append(f"node {node_id}: title {ta!r} vs twin {tb!r}")
    return problems


def format_api(prompt: dict, object_info: dict | None = None) -> str:
    """An API prompt as the twins are written: a block per node, short inputs on one line, else one
    input per line (in the order the server declares them), links inline as ["1", 0]."""
    def order(node):
        inputs = node["inputs"]
        if object_info and node["class_type"] in object_info:
            spec = object_info[node["class_type"]]["input"]
            declared = [*spec.get("required", {}), *spec.get("optional", {})]
            keys = [k for k in declared if k in inputs] + [k for k in inputs if k not in declared]
            return {k: inputs[k] for k in keys}
        return inputs

    blocks = []
    for node_id in sorted(prompt, key=lambda k: (len(k), k)):
        node = prompt[node_id]
        inputs = order(node)
        one_line = json.dumps(inputs, ensure_ascii=False)
        if len(one_line) <= 90:
            inputs_text = one_line
        else:
            lines = [f"      {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}" for k, v in inputs.items()]
            inputs_text = "{\n" + ",\n".join(lines) + "\n    }"
        parts = [f'    "class_type": {json.dumps(node["class_type"])}', f'    "inputs": {inputs_text}']
        if "_meta" in node:
            parts.append(f'    "_meta": {json.dumps(node["_meta"], ensure_ascii=False)}')
        blocks.append(f"  {json.dumps(node_id)}: {{\n" + ",\n".join(parts) + "\n  }")
    text = "{\n" + ",\n".join(blocks) + "\n}\n"
    assert json.loads(text) == prompt
    return text


def missing_required_inputs(api: dict, object_info: dict) -> list[str]:
    """Required inputs of each node that the API prompt leaves out (e.g. a widget added to a node since)."""
    out = []
    for node_id, node in api.items():
        required = object_info[node["class_type"]]["input"].get("required", {})
        for name in required:
            if name not in node["inputs"]:
                out.append(f"node {node_id} ({node['class_type']}).{name}")
    return out
