#!/usr/bin/env python
"""Regenerate the UI-format example workflows and their thumbnails from the API twins, in the real
ComfyUI frontend against a real headless ComfyUI server (CPU):

    .venv/bin/python scripts/make_workflow_assets.py                 # all (see scripts/example_workflows.py)
    .venv/bin/python scripts/make_workflow_assets.py --only tiled_upscale_2x
    .venv/bin/python scripts/make_workflow_assets.py --update-api    # after a node gained an input

For each example: the API twin (example_workflows/api/NAME.json) is built node by node in the page
with the frontend's own node classes (LiteGraph.createNode, widgets set by name, sockets connected),
laid out in columns, given a note (its title, its one-line description, the details), and exported with
the app's own serializer (app.graphToPrompt(), what Export writes) to example_workflows/TITLE.json (the
file name is the title ComfyUI shows on the template card; see docs/templates.md). The API prompt the frontend makes from that graph
must equal the twin (inputs the server declares, titles): a mismatch stops the script, unless
--update-api, which rewrites the twin from the frontend's prompt (new inputs get their defaults).
Then the written file is opened in the UI (Ctrl+O), run from the UI (Run) on ComfyUI's example.png
(the photo workflow on scikit-image's astronaut photo, put in under that name for the run), and the
saved output becomes example_workflows/TITLE.jpg (384 px: the face, left
half the input enlarged bicubic or the image before the colour fix, right half the output; the
Chain-of-Zoom loop: its states x0..x3, 2 x 2, 512 px; the Chain-of-Zoom loop with its own model, run
here on tiny random weights: a diagram, the input with the regions the loop enlarges and the files it
needs, no output pixels). A screenshot of each loaded workflow goes
to out/workflow_assets/. The prompt-model workflow runs with the tiny offline VLM in place of
Qwen2.5-VL-3B-Instruct (the only change; see example_workflows.run_variant). The SD x4 workflow runs
unchanged, with tiny random weights installed under the folder name it loads
(models/diffusers/stable-diffusion-x4-upscaler), on the picture at 256 px (Example.input_side); its
thumbnail is a diagram too: that picture with the latent tiles the run denoised (planned by the pack's
tiler from the workflow's tile and overlap) and the folder it needs, not the random weights' noise.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_smoke  # noqa: E402
from comfy_browser import ComfyBrowser  # noqa: E402
from comfy_headless import ComfyServer  # noqa: E402
from example_workflows import (  # noqa: E402
    BY_NAME, EXAMPLES, INPUT_IMAGE, PROMPT_MODEL_LOADER, REPO_ROOT, TINY_VLM, Example, api_differences, astronaut,
    example_picture, install_inputs, format_api, missing_required_inputs,
)

THUMB_MAX = 384
GRID_CELL = 256
JPEG_QUALITY = 82
SCREENSHOTS = REPO_ROOT / "out" / "workflow_assets"
# DREAMFORGE_BENCH_OUT=DIR (scripts/bench_smoke.py): every file this script writes goes under DIR instead
if bench_smoke.out_dir() is not None:
    SCREENSHOTS = bench_smoke.out_dir() / "workflow_assets"


def twin_from_frontend(made: dict, object_info: dict) -> dict:
    """An API twin from the frontend's prompt: only inputs the server declares (FLOAT ones as floats:
    JavaScript has one number type), with titles."""
    out = {}
    for node_id in sorted(made, key=int):
        node = made[node_id]
        spec = object_info[node["class_type"]]["input"]
        declared = {**spec.get("required", {}), **spec.get("optional", {})}
        inputs = {}
        for key, value in node["inputs"].items():
            if key not in declared:
                continue
            if declared[key][0] == "FLOAT" and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            inputs[key] = value
        out[node_id] = {"class_type": node["class_type"], "inputs": inputs,
                        "_meta": {"title": node.get("_meta", {}).get("title", node["class_type"])}}
    return out


def finish_workflow(workflow: dict, example: Example) -> dict:
    """What a shared file should carry: a stable id, no saved view (ComfyUI fits the view on open), and
    properties.models (name, URL, folder) on each node that loads a model with a direct link."""
    workflow = json.loads(json.dumps(workflow))
    models = example.properties_models()
    for node in workflow["nodes"]:
        if str(node["id"]) in models:
            node.setdefault("properties", {})["models"] = models[str(node["id"])]
    workflow["id"] = str(uuid.uuid5(uuid.NAMESPACE_URL, f"dreamforge-upscale/example_workflows/{example.name}"))
    workflow.setdefault("extra", {}).pop("ds", None)
    return workflow


# the face, as fractions of the picture (left, top, right, bottom): in ComfyUI's example.png, in the astronaut
FACE = {"example": (0.36, 0.18, 0.66, 0.48), "photo": (0.33, 0.04, 0.63, 0.34)}


def thumbnail_picture(example: Example, size: int | None = None):
    """What the example runs on for its thumbnail: ComfyUI's example.png, or the astronaut photo."""
    return astronaut(size) if example.thumbnail_input == "photo" else example_picture(size)


def _crop(im, box=FACE["example"]):
    w, h = im.size
    return im.crop((round(box[0] * w), round(box[1] * h), round(box[2] * w), round(box[3] * h)))


ZOOM_COLOURS = ((255, 214, 10), (255, 120, 40), (240, 40, 90), (170, 60, 255))


def _zoom_diagram(before: Path, steps: int, caption: tuple[str, ...]):
    """The input as the loop's x0 (centre square) with the region each step enlarges outlined (step n: the
    centre 1/4**n of the side) and the caption in a box: what the workflow does and needs, no output pixels."""
    from PIL import Image, ImageDraw, ImageFont, ImageOps

    side = THUMB_MAX
    with Image.open(before) as b:
        thumb = ImageOps.fit(b.convert("RGB"), (side, side), Image.Resampling.LANCZOS)
    draw = ImageDraw.Draw(thumb, "RGBA")
    font = ImageFont.load_default(size=max(12, side // 22))
    for n in range(1, steps + 1):
        half = side / 4**n / 2
        if half < 1:
            break
        colour = ZOOM_COLOURS[(n - 1) % len(ZOOM_COLOURS)]
        c = side / 2
        draw.rectangle([(c - half, c - half), (c + half, c + half)], outline=colour, width=2)
        if half >= 10:  # room for its zoom factor beside it
            draw.text((c + half + 4, c - half - 2), f"{4**n}x", font=font, fill=colour, stroke_width=2,
                      stroke_fill=(0, 0, 0))
    _caption_box(draw, caption, font)
    return thumb


def _caption_box(draw, caption: tuple[str, ...], font) -> None:
    """`caption` in white on a dark box in the top-left corner (what the workflow needs)."""
    if not caption:
        return
    lines = [draw.textbbox((0, 0), line, font=font) for line in caption]
    height = sum(bb[3] - bb[1] + 6 for bb in lines) + 10
    width = max(bb[2] - bb[0] for bb in lines) + 20
    draw.rectangle([(0, 0), (width, height)], fill=(0, 0, 0, 175))
    y = 8
    for line, bb in zip(caption, lines):
        draw.text((10, y - bb[1]), line, font=font, fill=(255, 255, 255))
        y += bb[3] - bb[1] + 6


def latent_tiles(height: int, width: int, tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """The latent tiles (x0, y0, x1, y1) the SD x4 node denoises on an input of this size (its latent is the
    input's size), planned by the pack's own tiler."""
    import pack_import  # scripts/pack_import.py: the backends as dreamforge_upscale.*, without ComfyUI

    if "dreamforge_upscale" not in sys.modules:
        pack_import.install()
    from dreamforge_upscale.tiling.latent_denoise import plan_latent

    plan = plan_latent(height, width, tile, overlap)
    return [(c, r, c + plan.cols.tile, r + plan.rows.tile) for r in plan.rows.starts for c in plan.cols.starts]


def _tile_diagram(before: Path, tile: int, overlap: int, caption: tuple[str, ...]):
    """The input with the latent tiles the SD x4 node denoises outlined (overlaps show where two tiles are
    blended) and the caption: what the workflow does and needs, no output pixels."""
    from PIL import Image, ImageDraw, ImageFont, ImageOps

    side = THUMB_MAX
    with Image.open(before) as b:
        width, height = b.size
        thumb = ImageOps.fit(b.convert("RGB"), (side, side), Image.Resampling.LANCZOS)
    draw = ImageDraw.Draw(thumb, "RGBA")
    sx, sy = side / width, side / height
    for i, (x0, y0, x1, y1) in enumerate(latent_tiles(height, width, tile, overlap)):
        colour = ZOOM_COLOURS[i % len(ZOOM_COLOURS)]
        inset = 1 + 2 * (i % 2)  # neighbours' borders stay apart where the tiles overlap
        draw.rectangle([(x0 * sx + inset, y0 * sy + inset), (x1 * sx - inset, y1 * sy - inset)],
                       outline=colour, width=2, fill=(*colour, 28))
    _caption_box(draw, caption, ImageFont.load_default(size=max(12, side // 24)))
    return thumb


def make_thumbnail(after: list[Path], before: Path | None, mode: str, dest: Path, label: str = "",
                   box=FACE["example"], steps: int = 0, caption: tuple[str, ...] = (), tiles: tuple[int, int] = (0, 0)
                   ) -> tuple[int, int]:
    """grid: the first four images 2 x 2; compare: the face (`box`; the whole picture when the run's input
    was already the face), left half before, right half after; zoom_diagram: the input with the regions
    `steps` zoom steps enlarge and `caption`; tile_diagram: the input with the latent tiles of
    `tiles` = (tile, overlap) and `caption`; the label on a dark band at the bottom."""
    from PIL import Image, ImageDraw, ImageFont

    images = [Image.open(p).convert("RGB") for p in after]
    if mode == "grid":
        cells = images[:4]
        if len(cells) < 4:
            raise SystemExit(f"{dest.name}: a grid thumbnail needs 4 images, the run saved {len(images)}")
        thumb = Image.new("RGB", (2 * GRID_CELL, 2 * GRID_CELL))
        for i, im in enumerate(cells):
            cell = im.resize((GRID_CELL, GRID_CELL), Image.Resampling.LANCZOS)
            thumb.paste(cell, ((i % 2) * GRID_CELL, (i // 2) * GRID_CELL))
    elif mode == "compare":
        side = THUMB_MAX
        out = _crop(images[0], box).resize((side, side), Image.Resampling.LANCZOS)
        with Image.open(before) as b:
            # the input as it is, enlarged without adding detail (bicubic) to the same view
            src = _crop(b.convert("RGB"), box).resize((side, side), Image.Resampling.BICUBIC)
        thumb = out.copy()
        thumb.paste(src.crop((0, 0, side // 2, side)), (0, 0))
        ImageDraw.Draw(thumb).line([(side // 2, 0), (side // 2, side)], fill=(255, 255, 255), width=2)
    elif mode == "zoom_diagram":
        thumb = _zoom_diagram(before, steps, caption)
    elif mode == "tile_diagram":
        thumb = _tile_diagram(before, *tiles, caption)
    else:
        raise ValueError(mode)
    if label:
        draw = ImageDraw.Draw(thumb, "RGBA")
        font = ImageFont.load_default(size=max(14, thumb.width // 18))
        box = draw.textbbox((0, 0), label, font=font)
        band = box[3] - box[1] + 14
        draw.rectangle([(0, thumb.height - band), (thumb.width, thumb.height)], fill=(0, 0, 0, 170))
        draw.text((10, thumb.height - band + 7 - box[1]), label, font=font, fill=(255, 255, 255))
    thumb.save(dest, "JPEG", quality=JPEG_QUALITY, optimize=True, progressive=True)
    return thumb.size


def build_one(ui, server: ComfyServer, example: Example, object_info: dict, update_api: bool,
              thumbnails: bool, image_size: int | None = None) -> dict:
    api = example.api()
    missing = missing_required_inputs(api, object_info)
    if missing and not update_api:
        raise SystemExit(f"{example.api_path.name}: inputs the nodes now require are missing: {missing}. "
                         "Run again with --update-api to take their defaults from the frontend.")
    built = ui.build_from_api(api, [example.full_note])
    made = built["output"]
    problems = api_differences(made, api, object_info)
    ui_path, thumbnail_path = bench_smoke.out_path(example.ui_path), bench_smoke.out_path(example.thumbnail_path)
    if update_api:
        fresh = twin_from_frontend(made, object_info)
        text = format_api(fresh, object_info)
        if text != example.api_path.read_text():
            api_path = bench_smoke.out_path(example.api_path)
            api_path.write_text(text)
            print(f"  updated {shown(api_path)} ({len(problems)} differences)")
        api = fresh
    elif problems:
        raise SystemExit(f"{example.name}: the frontend's prompt differs from the twin:\n  " + "\n  ".join(problems))
    workflow = finish_workflow(built["workflow"], example)
    ui_path.write_text(json.dumps(workflow, indent=2) + "\n")
    print(f"  wrote {shown(ui_path)} ({len(workflow['nodes'])} nodes)")

    # open the written file as a user does, check it, and run it from the UI
    ui.clear_toasts()
    ui.open_workflow_file(ui_path)
    problems = ui.loaded_differences(workflow)
    if problems:
        raise SystemExit(f"{example.name}: the written file does not load as written:\n  " + "\n  ".join(problems))
    again = api_differences(ui.graph_to_prompt()["output"], api, object_info)
    if again:
        raise SystemExit(f"{example.name}: after reopening, the prompt differs from the twin: {again}")
    for node in workflow["nodes"]:
        if node["type"] == PROMPT_MODEL_LOADER:
            ui.set_widget(node["id"], "model_name", TINY_VLM)
    ui.fit_view()
    ui.screenshot(SCREENSHOTS / f"{example.name}_loaded.png")
    result = {"name": example.name}
    if not thumbnails:
        return result
    swapped = example.input_side or example.thumbnail_input != "example"
    if swapped:  # this example runs on its own picture or size (example.png is put back after)
        side = example.input_side or image_size
        if bench_smoke.smoke() and example.input_side:
            side = min(example.input_side, image_size or example.input_side)
        server.add_input_image(thumbnail_picture(example, side), INPUT_IMAGE)
    try:
        started = time.monotonic()
        prompt_id = ui.queue_from_ui()
        ui.wait_for_prompt(prompt_id, timeout=900)
        result["run_seconds"] = round(time.monotonic() - started, 1)
        entry = server.history(prompt_id)
        server.raise_for_status(entry)

        def images_of(node_id):
            return server.output_images({"outputs": {node_id: entry["outputs"][node_id]}})

        before = images_of(example.before_node)[0] if example.before_node else server.input_dir / INPUT_IMAGE
        steps = next((n["inputs"]["steps"] for n in api.values() if n["class_type"] == "DreamForgeCoZLoop"), 0)
        tiles = next(((n["inputs"]["tile"], n["inputs"]["overlap"]) for n in api.values()
                      if n["class_type"] == "DreamForgeSDX4Upscale"), (0, 0))
        size = make_thumbnail(images_of(example.thumbnail_node), before, example.thumbnail, thumbnail_path,
                              example.label, box=(0, 0, 1, 1) if example.input_side else FACE[example.thumbnail_input],
                              steps=steps,
                              caption=example.caption, tiles=tiles)
    finally:
        if swapped:
            server.add_input_image(example_picture(image_size), INPUT_IMAGE)
    ui.screenshot(SCREENSHOTS / f"{example.name}_ran.png")
    result.update(thumbnail=size, kb=round(thumbnail_path.stat().st_size / 1024, 1))
    print(f"  ran from the UI in {result['run_seconds']} s; thumbnail {thumbnail_path.name} "
          f"{size[0]}x{size[1]}, {result['kb']} KB")
    return result


def photo_model() -> Path:
    """RealESRGAN_x4plus.pth for the photo example's run: ../shared/weights (or $DF_SHARED_WEIGHTS), else
    where `assets prefetch` installs it (the models root)."""
    import os

    for folder in (os.environ.get("DF_SHARED_WEIGHTS"), REPO_ROOT.parent / "shared" / "weights",
                   os.environ.get("DF_MODELS_ROOT") and Path(os.environ["DF_MODELS_ROOT"]) / "upscale_models",
                   Path.home() / ".cache" / "dreamforge-upscale" / "models" / "upscale_models"):
        if folder and (Path(folder) / "RealESRGAN_x4plus.pth").is_file():
            return Path(folder) / "RealESRGAN_x4plus.pth"
    raise SystemExit("the photo example needs RealESRGAN_x4plus.pth: python scripts/dreamforge_assets.py prefetch "
                     "--bundle upscalers --only RealESRGAN_x4plus")


def shown(path: Path) -> str:
    """A written file's path as printed: relative to the checkout when it is inside it."""
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=sorted(BY_NAME), help="these examples only")
    parser.add_argument("--update-api", action="store_true",
                        help="rewrite the API twins from the frontend's prompt (new inputs take their defaults)")
    parser.add_argument("--no-thumbnails", action="store_true", help="write the UI files only, do not run them")
    parser.add_argument("--image-size", type=int, default=None,
                        help="run on example.png resized to this size instead of its 768 px")
    parser.add_argument("--verbose", action="store_true", help="print the browser console")
    args = parser.parse_args(argv)
    examples = [BY_NAME[n] for n in args.only] if args.only else EXAMPLES
    needs = {}
    if bench_smoke.smoke():  # the code path only: one example (the one asked for, else the first), a 64 px face,
        examples = examples[:1]  # and only the tiny models that example loads
        args.image_size = min(args.image_size or 64, 64)
        names = {e.name for e in examples}
        needs = dict(prompt_model="coz_prompt_loop" in names, sdx4=any("sdx4" in n for n in names),
                     coz_sd3="coz_own_model" in names)

    photo_models = [photo_model()] if any(e.models for e in examples) else []
    server = ComfyServer(models=photo_models)
    install_inputs(server, image_size=args.image_size, **needs)
    try:
        server.start(timeout=240)
        object_info = server.object_info()
        with ComfyBrowser(viewport=(1600, 1000), log_console=args.verbose) as browser:
            ui = browser.open(server.url)
            for example in examples:
                print(f"{example.name}:")
                try:
                    build_one(ui, server, example, object_info, args.update_api, not args.no_thumbnails,
                              args.image_size)
                except BaseException:
                    shot = ui.screenshot(SCREENSHOTS / f"{example.name}_failed.png")
                    print(f"  failed; screenshot {shot}", file=sys.stderr)
                    raise
    except BaseException:
        print(f"ComfyUI log: {server.log_path}\n{server.log_tail(30)}", file=sys.stderr)
        raise
    finally:
        server.stop()
    server.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
