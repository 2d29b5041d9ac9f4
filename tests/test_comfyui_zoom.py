"""Chain-of-Zoom nodes inside a real ComfyUI 0.3.75 server (the session's `comfy` fixture), over HTTP.

The API workflows under example_workflows/api/coz_*.json are what is queued (with small inputs and a
small process size so the CPU suite stays fast). The prompt model is a tiny random Qwen2-VL written
into the server's models/LLM folder (tests/tiny_vlm.py); the upscaler is the bundled Compact x4.
"""
from __future__ import annotations

import json
import struct
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from comfy_headless import ComfyServer  # noqa: E402 - conftest puts scripts/ on sys.path
from dreamforge_upscale.upscalers import GANUpscaler
from dreamforge_upscale.assets.bundled_model import bundled_model_path
from dreamforge_upscale.zoom import (
    MODES, SINGLE_IMAGE_INSTRUCTION, TWO_IMAGE_INSTRUCTION, ZoomSettings, prepare, zoom_loop,
)
from dreamforge_upscale.zoom.vlm import VLMPromptProvider
from tiny_vlm import save_tiny_vlm

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / "example_workflows" / "api"
ZOOM_NODES = ("DreamForgeCoZStep", "DreamForgeCoZLoop", "DreamForgeCoZUpscale", "DreamForgeLoadPromptModel",
              "DreamForgePromptFromImage")
TINY_VLM = "tiny-qwen2-vl"
PREVIEW_IMAGE_EVENT = 1  # ComfyUI BinaryEventTypes.PREVIEW_IMAGE


# ------------------------------------------------------------------------------------- helpers
def workflow(name: str) -> dict:
    return json.loads((WORKFLOWS / name).read_text())


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def saved(comfy: ComfyServer, entry: dict, node_id: str) -> list[np.ndarray]:
    paths = comfy.output_images({"outputs": {node_id: entry["outputs"][node_id]}})
    out = []
    for p in paths:
        with Image.open(p) as im:
            out.append(np.asarray(im.convert("RGB")))
    return out


def text_of(entry: dict, node_id: str) -> str:
    return entry["outputs"][node_id]["text"][0]


def input_pil(comfy: ComfyServer, name: str) -> Image.Image:
    with Image.open(comfy.input_dir / name) as im:
        return im.convert("RGB")


def as_tensor(pil: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0)[None]


@pytest.fixture(scope="module")
def llm(comfy):
    """The tiny VLM in the server's models/LLM (the folder is created before anything lists it)."""
    folder = save_tiny_vlm(comfy.base / "models" / "LLM" / TINY_VLM)
    return folder


@pytest.fixture(scope="module")
def compact():
    return GANUpscaler.load(bundled_model_path())


# ------------------------------------------------------------------------------------- tests
def test_zoom_nodes_are_registered_and_the_prompt_model_is_listed(comfy, llm):
    info = comfy.object_info()
    for node in ZOOM_NODES:
        assert node in info, node
        assert info[node]["category"] == "DreamForge/zoom"
    assert comfy.import_failures("dreamforge-upscale-test") == []
    loop = info["DreamForgeCoZLoop"]["input"]
    assert loop["required"]["mode"][0] == list(MODES)
    assert "prompt_model" in loop["optional"]
    names = comfy.object_info("DreamForgeLoadPromptModel")["input"]["required"]["model_name"][0]
    assert TINY_VLM in names


def test_loop_workflow_with_the_gan_matches_the_backend_and_follows_the_preview_setting(comfy, compact):
    g = workflow("coz_loop_gan.json")
    g["1"]["inputs"]["image"] = "astronaut_512.png"
    g["3"]["inputs"].update(steps=3, process_size=128, prompt="astronaut", mode="recursive")
    g["4"]["inputs"]["filename_prefix"] = unique("coz_loop")
    ws = comfy.listen()
    try:
        prompt_id = comfy.queue(g)
        entry = comfy.wait(prompt_id, timeout=180)
        time.sleep(0.3)
        events, frames = ws.snapshot(), list(ws.binary)
    finally:
        ws.close()
    ComfyServer.raise_for_status(entry)
    states = saved(comfy, entry, "4")
    assert len(states) == 4 and all(s.shape == (128, 128, 3) for s in states)
    assert text_of(entry, "5").splitlines() == ["astronaut"] * 3
    receipt = json.loads(text_of(entry, "6"))
    assert receipt["steps"] == 3 and receipt["magnifications"] == [1, 4, 16, 64]
    assert receipt["upscaler"]["model"]["file"] == "realesr-animevideov3.pth"
    # the same loop run here, outside ComfyUI: the same states (threads may flip a last bit)
    ours = zoom_loop(compact, as_tensor(input_pil(comfy, "astronaut_512.png")), 3,
                     ZoomSettings(mode="recursive", process_size=128, user_prompt="astronaut"))
    for n, (a, b) in enumerate(zip(states, ours.states[0])):
        assert np.abs(a.astype(np.int16) - np.asarray(b, np.int16)).max() <= 1, n
    assert np.array_equal(states[0], np.asarray(prepare(input_pil(comfy, "astronaut_512.png"), 128)))
    # progress per step; no preview frames, since the session server runs without --preview-method
    # (test_comfyui_v3.py checks the previews on a server started with one)
    ticks = [m["data"]["value"] for m in events if m.get("type") == "progress"
             and m["data"].get("prompt_id") == prompt_id and m["data"].get("node") == "3"]
    assert ticks == [0, 1, 2, 3]
    assert [f for f in frames if struct.unpack(">I", f[:4])[0] == PREVIEW_IMAGE_EVENT] == []


def test_steps_chained_twice_equal_the_loop(comfy):
    g = workflow("coz_step_chain.json")
    g["1"]["inputs"]["image"] = "chelsea_97x75.png"
    for node in ("3", "4"):
        g[node]["inputs"].update(process_size=64, seed=5, prompt="cat", color_fix="adain")
    g["5"]["inputs"]["filename_prefix"] = unique("coz_step1")
    g["6"]["inputs"]["filename_prefix"] = unique("coz_step2")
    g["20"] = {"class_type": "DreamForgeCoZLoop", "inputs": {
        "image": ["1", 0], "upscaler": ["2", 0], "steps": 2, "mode": "recursive_multiscale", "process_size": 64,
        "prompt": "cat", "color_fix": "adain", "seed": 5, "tile": 0}}
    g["21"] = {"class_type": "SaveImage", "inputs": {"images": ["20", 0], "filename_prefix": unique("coz_loop2")}}
    g["22"] = {"class_type": "PreviewAny", "inputs": {"source": ["20", 2]}}
    entry = comfy.run(g, timeout=180)
    (x1,), (x2,) = saved(comfy, entry, "5"), saved(comfy, entry, "6")
    loop = saved(comfy, entry, "21")
    assert len(loop) == 3 and x1.shape == x2.shape == (64, 64, 3)
    assert np.array_equal(x1, loop[1]) and np.array_equal(x2, loop[2])
    step2 = json.loads(text_of(entry, "7"))
    loop_receipt = json.loads(text_of(entry, "22"))
    assert step2["seed"] == loop_receipt["step_receipts"][1]["seed"]
    assert step2["crop"] == loop_receipt["step_receipts"][1]["crop"] == {"source": "x1", "box": [24, 24, 40, 40],
                                                                          "factor": 4}


def test_full_image_2_5x_workflow(comfy):
    g = workflow("coz_upscale_2_5x.json")
    g["1"]["inputs"]["image"] = "chelsea_97x75.png"
    g["4"]["inputs"]["filename_prefix"] = unique("coz_x2_5")
    entry = comfy.run(g, timeout=180)
    (out,) = saved(comfy, entry, "4")
    assert out.shape == (round(75 * 2.5), round(97 * 2.5), 3) == (188, 242, 3)
    receipt = json.loads(text_of(entry, "5"))
    assert receipt["pass_count"] == 1 and len(receipt["passes"]) == 1 and receipt["output_size"] == [242, 188]
    assert receipt["resampled"] == {"from_scale": 4, "method": "lanczos"}
    src = np.asarray(input_pil(comfy, "chelsea_97x75.png"), np.float64)
    back = np.asarray(Image.fromarray(out).resize((97, 75), Image.Resampling.BOX), np.float64)
    assert np.abs(back - src).mean() < 6  # it is the same picture, larger
    assert np.abs(back.mean((0, 1)) - src.mean((0, 1))).max() < 1.5  # colour kept (wavelet fix)


def test_prompt_from_image_feeds_the_loop(comfy, llm):
    g = workflow("coz_prompt_loop.json")
    g["1"]["inputs"]["image"] = "coffee_64.png"
    g["3"]["inputs"].update(model_name=TINY_VLM, max_new_tokens=6)
    g["4"]["inputs"]["max_new_tokens"] = 8
    g["5"]["inputs"].update(steps=2, process_size=64)
    g["6"]["inputs"]["filename_prefix"] = unique("coz_prompted")
    g["9"] = {"class_type": "PreviewAny", "inputs": {"source": ["5", 2]}}
    entry = comfy.run(g, timeout=240)
    description = text_of(entry, "8")
    prompts = text_of(entry, "7").splitlines()
    receipt = json.loads(text_of(entry, "9"))
    states = saved(comfy, entry, "6")
    # the same tiny model here gives the same greedy text for the same pixels
    vlm = VLMPromptProvider.load(llm)
    image = input_pil(comfy, "coffee_64.png")
    assert description and description == vlm.describe([image], SINGLE_IMAGE_INSTRUCTION, max_new_tokens=8)
    assert len(prompts) == 2
    x = [Image.fromarray(s) for s in states]
    for n in (1, 2):
        step = receipt["step_receipts"][n - 1]["prompt"]
        assert step["provider"] == f"vlm:{TINY_VLM}" and step["images"] == 2
        view = x[n - 1].crop((24, 24, 40, 40)).resize((64, 64), Image.Resampling.BICUBIC)
        assert step["generated"] == vlm.describe([x[n - 1], view], TWO_IMAGE_INSTRUCTION, max_new_tokens=6)
        assert prompts[n - 1] == step["text"] == f"{step['generated']}, {description},"


def test_full_image_makes_no_per_tile_prompts_for_a_gan(comfy, llm):
    """A GAN ignores prompts: no prompt-model call per tile (the receipt says so); one prompt per tile for
    upscalers that take them is tested in tests/test_zoom_full_image.py."""
    g = workflow("coz_upscale_2_5x.json")
    g["1"]["inputs"]["image"] = "chelsea_97x75.png"
    # 16 px tiles + Compact's 32 px context: 75 rows fit one window, 97 columns need several
    g["3"]["inputs"].update(scale=2.0, tile=16, overlap=4, prompt="cat", prompt_model=["10", 0])
    g["4"]["inputs"]["filename_prefix"] = unique("coz_tile_prompts")
    g["10"] = {"class_type": "DreamForgeLoadPromptModel", "inputs": {
        "model_name": TINY_VLM, "dtype": "auto", "max_new_tokens": 4, "temperature": 0.0}}
    entry = comfy.run(g, timeout=240)
    (out,) = saved(comfy, entry, "4")
    assert out.shape == (150, 194, 3)
    (one_pass,) = json.loads(text_of(entry, "5"))["passes"]
    (gan_pass,) = one_pass["upscale"]["passes"]
    assert gan_pass["tiles"]["count"] > 1 and gan_pass["prompts"] == []
    assert one_pass["upscale"]["prompt"] == {
        "mode": "per_tile", "text": None, "used": False,
        "note": "the model takes no prompt: no prompt was made for its tiles"}


def test_interrupt_mid_loop_stops_and_the_server_keeps_serving(comfy):
    g = workflow("coz_loop_gan.json")
    g["1"]["inputs"]["image"] = "astronaut_512.png"
    # 8 steps of 128 px crops at process size 512 (~1 s a step here): the interrupt comes after step 1
    g["3"]["inputs"].update(steps=8, process_size=512, mode="recursive")
    g["4"]["inputs"]["filename_prefix"] = unique("coz_interrupted")
    ws = comfy.listen()
    try:
        prompt_id = comfy.queue(g)
        first = ws.wait_for(lambda m: m.get("type") == "progress" and m["data"].get("prompt_id") == prompt_id
                            and m["data"].get("node") == "3" and m["data"]["value"] >= 1, timeout=180)
        assert first["data"]["max"] == 8
        asked = time.monotonic()
        assert comfy.post_interrupt() == 200
        entry = comfy.wait(prompt_id, timeout=60)
        took = time.monotonic() - asked
        ticks = [m["data"]["value"] for m in ws.snapshot() if m.get("type") == "progress"
                 and m["data"].get("prompt_id") == prompt_id and m["data"].get("node") == "3"]
    finally:
        ws.close()
    assert ComfyServer.outcome(entry) == "interrupted", ComfyServer.messages(entry)
    stopped = dict(ComfyServer.messages(entry))["execution_interrupted"]
    assert stopped["node_type"] == "DreamForgeCoZLoop" and stopped["node_id"] == "3"
    assert max(ticks) < 8 and took < 20, (ticks, took)
    assert not entry.get("outputs"), "an interrupted loop must not save images"
    _good_loop(comfy)


def _good_loop(comfy: ComfyServer) -> None:
    g = workflow("coz_loop_gan.json")
    g["1"]["inputs"]["image"] = "coffee_64.png"
    g["3"]["inputs"].update(steps=1, process_size=64, seed=int(time.time()) % 1000)
    g["4"]["inputs"]["filename_prefix"] = unique("coz_after")
    entry = comfy.run(g, timeout=120)
    assert len(saved(comfy, entry, "4")) == 2


def test_bad_inputs_give_clear_errors_and_the_server_recovers(comfy):
    from spandrel.architectures.Compact import Compact

    x2 = comfy.upscale_models_dir / "compact_x2.pth"
    torch.save(Compact(num_feat=8, num_conv=2, upscale=2).state_dict(), x2)
    g = workflow("coz_loop_gan.json")
    g["1"]["inputs"]["image"] = "coffee_64.png"
    g["2"]["inputs"]["model_name"] = "compact_x2.pth"
    g["3"]["inputs"].update(steps=1, process_size=64)
    g["4"]["inputs"]["filename_prefix"] = unique("coz_x2")
    try:
        entry = comfy.wait(comfy.queue(g), timeout=120)
    finally:  # the session's server is shared: an x2 GAN left in its folder would change other tests' auto picks
        x2.unlink()
    err = ComfyServer.execution_error(entry)
    assert err and err["node_type"] == "DreamForgeCoZLoop" and err["exception_type"].endswith("UpscalerError")
    assert "needs a 4x upscaler; compact_x2.pth is native x2" in err["exception_message"]

    g = workflow("coz_upscale_2_5x.json")
    g["1"]["inputs"]["image"] = "chelsea_97x75.png"
    g["3"]["inputs"].update(scale=16.0, max_side=1024)
    g["4"]["inputs"]["filename_prefix"] = unique("coz_guard")
    started = time.monotonic()
    entry = comfy.wait(comfy.queue(g), timeout=120)
    err = ComfyServer.execution_error(entry)
    assert err and err["node_type"] == "DreamForgeCoZUpscale"
    assert "97x75 image into 1552x1200, over max_side 1024 px" in err["exception_message"]
    assert time.monotonic() - started < 30
    _good_loop(comfy)
