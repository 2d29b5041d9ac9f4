"""Every API twin in example_workflows/api/ is queued against the real ComfyUI server by some test.

Twins that another test file already queues by name (tests/test_comfyui_zoom.py queues the coz_*.json
ones with its own small settings) are left to it; this file queues the rest as they are, on the
astronaut face (128 px) saved as astronaut.png, and checks what they produce. The only change a run
makes is swapping a prompt model nobody can download here for the tiny offline VLM
(example_workflows.run_variant). The SD x4 workflow runs as it is: install_inputs puts a tiny random SD x4
upscaler under the folder name it loads (models/diffusers/stable-diffusion-x4-upscaler), so its picture
is noise of the right size and its receipt says what ran.
"""
from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from example_workflows import (  # noqa: E402
    BY_TITLE, EXAMPLES, IMAGE_NODES, INPUT_IMAGE, SAVE_WITH_RECEIPT, SDX4_FOLDER, UI_DIR, api_twin_files,
    install_inputs, run_variant, title_problems,
)
from workflow_expectations import EXPECTED_OUTPUTS, INPUT_SIDE, RANDOM_WEIGHTS  # noqa: E402

TESTS = Path(__file__).resolve().parent


def _queued_elsewhere() -> dict[str, str]:
    """Twins another test module loads by file name: {twin: test module}."""
    found = {}
    names = [p.name for p in api_twin_files()]
    for module in sorted(TESTS.glob("test_*.py")):
        if module.name == Path(__file__).name:
            continue
        text = module.read_text()
        for name in names:
            if re.search(rf"workflow\(\s*[\"']{re.escape(name)}[\"']\s*\)", text):  # loads it as a workflow
                found.setdefault(name, module.name)
    return found


ELSEWHERE = _queued_elsewhere()
HERE = [p for p in api_twin_files() if p.name not in ELSEWHERE]


def test_the_example_folder_holds_only_templates_named_by_their_titles():
    """ComfyUI 0.3.75 lists every *.json at the top of example_workflows/ as a template under its file name:
    each is a titled workflow with its .jpg, and there is no index.json (a broken "index" card there)."""
    top = sorted(p.name for p in UI_DIR.iterdir() if p.is_file())
    assert top == sorted([f"{e.title}.json" for e in EXAMPLES] + [f"{e.title}.jpg" for e in EXAMPLES]), top
    assert [problem for e in EXAMPLES for problem in title_problems(e.title)] == []
    assert len(BY_TITLE) == len(EXAMPLES) and all(e.api_path.is_file() for e in EXAMPLES)
    assert all(40 <= len(e.description) <= 120 and e.description.endswith(".") for e in EXAMPLES)


@pytest.mark.parametrize("title, why", [
    ("upscale_bundled_x4", "characters ['_']"),  # 1.32.9 shows "_" as it is in the title, as a space below
    ("Upscale: 4x?", "characters [':', '?']"),
    ("A title far too long to fit on one line of a card", "more than the 36"),
    (" Upscale  4x", "leading, trailing or double spaces"),
    ("index", "index.json"),
])
def test_title_problems_name_what_to_change(title, why):
    (problem,) = title_problems(title)
    assert why in problem and repr(title) in problem


@pytest.fixture(scope="module")
def server(comfy):
    install_inputs(comfy, image_size=INPUT_SIDE)
    return comfy


def _images(comfy, entry, node_id) -> list[np.ndarray]:
    out = []
    for path in comfy.output_images({"outputs": {node_id: entry["outputs"][node_id]}}):
        with Image.open(path) as im:
            out.append(np.asarray(im.convert("RGB"), dtype=np.float64))
    return out


def _input(comfy) -> np.ndarray:
    with Image.open(comfy.input_dir / INPUT_IMAGE) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float64)


def _down(img: np.ndarray, side: int) -> np.ndarray:
    """Box-filter down to side x side: what is left of an upscale is the picture's low frequencies."""
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    return np.asarray(pil.resize((side, side), Image.Resampling.BOX), dtype=np.float64)


def _receipts(entry) -> dict[str, dict]:
    """PreviewAny texts that are JSON receipts, by node id."""
    out = {}
    for node_id, ui in entry["outputs"].items():
        for text in ui.get("text", []):
            try:
                out[node_id] = json.loads(text)
            except (TypeError, json.JSONDecodeError):
                pass
    return out


def test_every_api_twin_is_queued_by_some_test():
    twins = {p.name for p in api_twin_files()}
    assert {"upscale_bundled_x4.json", "tiled_upscale_2x.json", "tiled_upscale_4x.json",
            "coz_prompt_loop.json", "coz_upscale_2_5x.json", "color_fix_after_gan.json", "sdx4_tiled_4x.json"} <= twins
    assert twins == set(ELSEWHERE) | {p.name for p in HERE}
    for name, module in ELSEWHERE.items():  # the other module really queues it (loads it as a workflow)
        assert re.search(rf"workflow\(\s*[\"']{re.escape(name)}[\"']\s*\)", (TESTS / module).read_text()), (name, module)


@pytest.mark.parametrize("path", HERE, ids=[p.stem for p in HERE])
def test_api_twin_runs_as_it_is(server, path):
    comfy = server
    prompt = run_variant(json.loads(path.read_text()))
    tag = uuid.uuid4().hex[:8]
    for node in prompt.values():  # fresh output names, so each run's files are its own
        if "filename_prefix" in node["inputs"]:
            node["inputs"]["filename_prefix"] += f"_{tag}"
    entry = comfy.run(prompt, timeout=600)  # the tiny SD x4 twin runs 20 steps: minutes on a loaded CPU

    # a twin without recorded expectations (a new one) still has to produce pictures
    expected = EXPECTED_OUTPUTS.get(path.stem) or {
        node_id: None for node_id, node in prompt.items() if node["class_type"] in IMAGE_NODES}
    assert expected, f"{path.name} has no image output"
    src = _input(comfy)
    for node_id, shape in expected.items():
        images = _images(comfy, entry, node_id)
        assert images
        for img in images:
            assert img.std() > 10  # a picture, not a flat fill
        if shape is None:
            continue
        count, width, height = shape
        assert len(images) == count
        for img in images:
            assert img.shape == (height, width, 3)
            if path.stem in RANDOM_WEIGHTS:  # tiny random weights: noise of the right size (receipt below)
                continue
            # the same picture, larger: scaled back down it is close to the input
            assert np.abs(_down(img, INPUT_SIDE) - src).mean() < 8, path.stem

    receipts = _receipts(entry)
    for node_id, node in prompt.items():  # a saved picture carries the receipt its Preview as Text shows
        if node["class_type"] == SAVE_WITH_RECEIPT:
            source = node["inputs"]["receipt"]
            shown = next(r for n, r in receipts.items() if prompt[n]["inputs"]["source"] == source)
            for saved in comfy.output_images({"outputs": {node_id: entry["outputs"][node_id]}}):
                with Image.open(saved) as im:
                    assert json.loads(im.text["dreamforge_receipt"]) == shown, saved
    if path.stem in ("upscale_bundled_x4", "upscale_photo_x4plus", "tiled_upscale_2x", "tiled_upscale_4x"):
        (receipt,) = receipts.values()
        scale = {"tiled_upscale_2x": 2}.get(path.stem, 4)
        assert receipt["impl"] == "gan" and receipt["native_scale"] == 4
        assert receipt["output_size"] == [INPUT_SIDE * scale] * 2
        assert receipt["model"]["file"] == ("RealESRGAN_x4plus.pth" if "photo" in path.stem else "realesr-animevideov3.pth")
        assert receipt["pass_count"] == 1 and len(receipt["passes"]) == 1
        assert (receipt["resampled"] is None) == (scale == 4)
    if path.stem == "sdx4_tiled_4x":
        (receipt,) = receipts.values()
        sd = next(n["inputs"] for n in prompt.values() if n["class_type"] == "DreamForgeSDX4Upscale")
        # the SD x4 model from the folder the workflow names made the picture: no fallback to a GAN or Lanczos
        assert receipt["impl"] == "diffusion" and receipt["model"]["file"] == SDX4_FOLDER, receipt
        assert "diffusers folder" in receipt["model"]["architecture"]
        assert receipt["retries"] == [] and receipt["fallbacks"] == [], receipt
        assert receipt["output_size"] == [INPUT_SIDE * 4] * 2 and receipt["resampled"] is None
        # with the workflow's prompt, seed and sampler settings ...
        backend = receipt["passes"][0]["backend"]
        assert receipt["prompt"]["text"] == sd["prompt"] and receipt["prompt"]["used"] is True
        assert [p["text"] for p in receipt["passes"][0]["prompts"]] == [sd["prompt"]]
        assert receipt["seed"] == sd["seed"] == backend["seed"]
        options = backend["options"]
        for key in ("negative_prompt", "steps", "guidance", "noise_level", "tile", "overlap", "vae_tile"):
            assert options[key] == sd[key], (key, options[key], sd[key])
        # ... denoised in latent tiles no larger than the workflow's tile (one tile when the input is no larger)
        tiles = backend["unet_tiles"]
        assert tiles["count"] == tiles["grid"][0] * tiles["grid"][1], tiles
        assert (tiles["count"] > 1) == (sd["tile"] < INPUT_SIDE), tiles
        assert max(tiles["tile"]) <= sd["tile"], tiles
        assert tiles["overlap"] >= sd["overlap"] or tiles["count"] == 1, tiles  # one tile overlaps nothing
    if path.stem == "color_fix_after_gan":
        (fixed,), (raw,) = _images(comfy, entry, "5"), _images(comfy, entry, "6")
        assert not np.array_equal(fixed, raw)  # the colour fix did something
        # ... and what it did is bring the picture's colours (low frequencies) to the input's
        err_fixed = np.abs(_down(fixed, INPUT_SIDE // 8) - _down(src, INPUT_SIDE // 8)).mean()
        err_raw = np.abs(_down(raw, INPUT_SIDE // 8) - _down(src, INPUT_SIDE // 8)).mean()
        assert err_fixed < 1.5 and err_fixed < err_raw, (err_fixed, err_raw)
