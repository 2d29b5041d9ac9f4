"""Load Tagger (DAPE / RAM tag prompts) inside a real ComfyUI 0.3.75 server (the session's `comfy` fixture).

Tiny random RAM + DAPE checkpoints (tests/tiny_ram.py) are written into the server's models/RAM. Their
image projection is zeroed, so the tags do not depend on the image: the prompts the server makes can be
predicted exactly here, whatever a thread count does to the last bits of the zoomed views. The tagger's
calls are counted from the server log: the provider logs one line per call.
"""
from __future__ import annotations

import json
import re
import uuid

import pytest
from PIL import Image

from comfy_headless import ComfyServer  # noqa: E402 - conftest puts scripts/ on sys.path
from dreamforge_upscale.zoom.tagger import TaggerProvider
from tiny_ram import save_tiny_dape, save_tiny_ram

RAM, DAPE = "ram_swin_large_14m.pth", "DAPE.pth"
NAME = f"dape:{RAM}+{DAPE}"
TAG_CALL = re.compile(re.escape(f"DreamForge tagger {NAME}: ") + r"\d+ tags in ")


@pytest.fixture(scope="module")
def tagger_files(comfy):
    folder = comfy.base / "models" / "RAM"
    ram = save_tiny_ram(folder / RAM, image_weight=0.0, fc_bias=-20.0)  # a handful of image-independent tags
    return ram, save_tiny_dape(folder / DAPE, ram)


@pytest.fixture(scope="module")
def expected_tags(tagger_files):
    tags = TaggerProvider.load(*tagger_files).describe([Image.new("RGB", (64, 64), (90, 120, 200))])
    assert tags.count(", ") >= 2  # several tags, so the prompt visibly carries them
    return tags


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def loader(**inputs) -> dict:
    return {"class_type": "DreamForgeLoadTagger", "inputs": {
        "ram_model": RAM, "dape": DAPE, "max_tags": 0, "drop_tags": "", "keep_tags": "", "threshold_offset": 0.0,
        "dtype": "auto", **inputs}}


def saver(source: list) -> dict:
    return {"class_type": "DreamForgeTestSaveText", "inputs": {"text": source, "filename_prefix": unique("dape")}}


def text_of(entry: dict, node_id: str) -> str:
    return entry["outputs"][node_id]["text"][0]


def tag_calls(comfy: ComfyServer) -> int:
    return len(TAG_CALL.findall(comfy.log_text()))


def test_load_tagger_is_listed_with_the_files_in_models_ram(comfy, tagger_files):
    info = comfy.object_info("DreamForgeLoadTagger")
    assert info["display_name"] == "Load Tagger (DreamForge)" and info["category"] == "DreamForge/zoom"
    assert info["output"] == ["PROMPT_MODEL"]
    required = info["input"]["required"]
    assert required["ram_model"][0][0] == RAM
    assert required["dape"][0][0] == "none" and DAPE in required["dape"][0]
    assert comfy.import_failures("dreamforge-upscale-test") == []


def test_tagger_prompts_each_loop_step_once(comfy, expected_tags):
    g = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "astronaut_192.png"}},
        "2": {"class_type": "DreamForgeLoadUpscaler",
              "inputs": {"model_name": "realesr-animevideov3.pth", "impl": "gan", "dtype": "auto"}},
        "3": loader(),
        "4": {"class_type": "DreamForgeCoZLoop", "inputs": {
            "image": ["1", 0], "upscaler": ["2", 0], "steps": 2, "mode": "recursive", "process_size": 64,
            "prompt": "astronaut", "color_fix": "wavelet", "seed": 0, "tile": 0, "prompt_model": ["3", 0]}},
        "5": saver(["4", 1]),
        "6": saver(["4", 2]),
    }
    before = tag_calls(comfy)
    entry = comfy.run(g, timeout=180)
    assert tag_calls(comfy) - before == 2  # one tag call per step
    assert text_of(entry, "5").splitlines() == [f"{expected_tags}, astronaut,"] * 2
    receipt = json.loads(text_of(entry, "6"))
    assert receipt["prompt_provider"] == NAME and receipt["mode"] == "recursive"
    assert [s["prompt"]["generated"] for s in receipt["step_receipts"]] == [expected_tags] * 2
    assert receipt["upscaler"]["model"]["file"] == "realesr-animevideov3.pth"

    # Prompt from Image takes the same PROMPT_MODEL (its language-model settings do not apply to tags)
    g = {
        "1": g["1"], "3": loader(),
        "7": {"class_type": "DreamForgePromptFromImage", "inputs": {
            "prompt_model": ["3", 0], "image": ["1", 0], "max_new_tokens": 32, "temperature": 0.0, "seed": 0}},
        "8": saver(["7", 0]),
    }
    before = tag_calls(comfy)
    entry = comfy.run(g, timeout=60)
    assert text_of(entry, "8") == expected_tags and tag_calls(comfy) - before == 1


def test_tag_options_and_bad_choices_through_the_server(comfy, expected_tags):
    first, *rest = expected_tags.split(", ")
    g = {"1": {"class_type": "LoadImage", "inputs": {"image": "coffee_64.png"}},
         "3": loader(drop_tags=first, keep_tags="coffee cup", max_tags=1),
         "7": {"class_type": "DreamForgePromptFromImage", "inputs": {
             "prompt_model": ["3", 0], "image": ["1", 0], "max_new_tokens": 32, "temperature": 0.0, "seed": 0}},
         "8": saver(["7", 0])}
    text = text_of(comfy.run(g, timeout=60), "8").split(", ")
    assert first not in text and "coffee cup" in text and len(text) == 2  # one fired tag + the kept one

    for inputs, phrase in (({"drop_tags": "astronot"}, "drop_tags: 'astronot' (did you mean astronaut"),
                           ({"dape": RAM}, f"dape: {RAM} is the RAM checkpoint itself")):
        g["3"] = loader(**inputs)
        g["8"] = saver(["7", 0])
        err = ComfyServer.execution_error(comfy.wait(comfy.queue(g), timeout=60))
        assert err and err["node_type"] == "DreamForgeLoadTagger" and err["exception_type"].endswith("UpscalerError")
        assert phrase in err["exception_message"]
