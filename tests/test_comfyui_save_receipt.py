"""Save Image + Receipt through the real session server, over HTTP: the saved PNG carries what
core SaveImage writes plus the upscale receipt in a `dreamforge_receipt` chunk, `receipt_file` writes
NAME.json beside it, a receipt that is not JSON is an execution error naming `receipt`, and with no
receipt the node is core SaveImage. --disable-metadata is checked at the function level in a fresh
interpreter (the session server runs without it; a second server would cost a startup).
"""
from __future__ import annotations

import io
import json
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from comfy_headless import ComfyServer, comfyui_dir  # noqa: E402 - conftest puts scripts/ on sys.path
from receipt_schema import problems

REPO = Path(__file__).resolve().parents[1]
IMAGE = "save_receipt_32.png"
CHUNK = "dreamforge_receipt"
WORKFLOW = {"last_node_id": 5, "nodes": [], "links": [], "version": 0.4, "extra": {"issue": 23}}


@pytest.fixture(scope="module")
def server(comfy):
    from skimage import data

    comfy.add_input_image(data.coffee()[150:182, 250:282], IMAGE)  # a real photo, 32x32
    return comfy


def _prefix(tag: str) -> str:
    return f"receipts/{tag}_{uuid.uuid4().hex[:8]}"  # a subfolder too, as core allows


def _graph(prefix: str, *, batch: int = 1, **save_inputs) -> dict:
    """LoadImage -> bundled x4 GAN -> our save node ("5"); the receipt also goes to the test text node ("6")."""
    g = {"1": {"class_type": "LoadImage", "inputs": {"image": IMAGE}},
         "3": {"class_type": "DreamForgeLoadUpscaler",
               "inputs": {"model_name": "realesr-animevideov3.pth", "impl": "auto", "dtype": "auto"}},
         "4": {"class_type": "DreamForgeESRGANUpscale",
               "inputs": {"image": ["2", 0] if batch > 1 else ["1", 0], "upscale_model": ["3", 0], "scale": 0.0,
                          "tile": 0, "overlap": 16, "resample": "lanczos"}},
         "5": {"class_type": "DreamForgeSaveImage", "inputs": {"images": ["4", 0], "filename_prefix": prefix,
                                                                **save_inputs}},
         "6": {"class_type": "DreamForgeTestSaveText", "inputs": {"text": ["4", 1], "filename_prefix": "save_receipt"}}}
    if batch > 1:  # distinct images: the photo and its mirror
        g["2"] = {"class_type": "DreamForgeTestImage", "inputs": {"image": ["1", 0], "mode": "batch", "count": batch}}
    return g


def _queue(comfy: ComfyServer, graph: dict, extra_pnginfo: dict | None = None) -> dict:
    body = {"prompt": graph, "client_id": comfy.client_id}
    if extra_pnginfo is not None:
        body["extra_data"] = {"extra_pnginfo": extra_pnginfo}  # what the frontend sends: the workflow
    status, answer = comfy.request("POST", "/prompt", body)
    assert status == 200, answer
    return comfy.wait(answer["prompt_id"], timeout=120)


def _view(comfy: ComfyServer, item: dict, filename: str | None = None) -> bytes | None:
    """A file of the output folder as the frontend fetches it (/view); None for 404."""
    query = urllib.parse.urlencode({"filename": filename or item["filename"], "subfolder": item["subfolder"],
                                    "type": item["type"]})
    try:
        with urllib.request.urlopen(f"{comfy.url}/view?{query}", timeout=30) as resp:
            return resp.read()
    except urllib.error.HTTPError as err:
        if err.code == 404:
            return None
        raise


def _png(comfy: ComfyServer, item: dict) -> tuple[dict, np.ndarray]:
    with Image.open(io.BytesIO(_view(comfy, item))) as im:
        im.load()
        return dict(im.text), np.asarray(im)


def _sidecar(comfy: ComfyServer, item: dict) -> bytes | None:
    return _view(comfy, item, Path(item["filename"]).with_suffix(".json").name)


def _as_queued(prompt: dict) -> dict:
    """The prompt chunk without what the server adds (LoadImage's is_changed hash)."""
    return {k: {"class_type": n["class_type"], "inputs": n["inputs"]} for k, n in prompt.items()}


def test_each_png_of_a_batch_carries_the_receipt_and_cores_metadata(server):
    prefix = _prefix("batch")
    graph = _graph(prefix, batch=2, receipt=["4", 1], receipt_file=True)
    graph["7"] = {"class_type": "DreamForgeSaveImage",  # receipt_file left at its default: no sidecar
                  "inputs": {"images": ["4", 0], "filename_prefix": prefix + "_nofile", "receipt": ["4", 1]}}
    entry = _queue(server, graph, {"workflow": WORKFLOW, "note": "kept"})
    ComfyServer.raise_for_status(entry)
    receipt = entry["outputs"]["6"]["text"][0]  # the upscale node's receipt string, as it left the node
    assert not problems(json.loads(receipt)) and json.loads(receipt)["batch"] == 2

    items = entry["outputs"]["5"]["images"]
    stem, subfolder = prefix.rsplit("/", 1)[1], prefix.rsplit("/", 1)[0]
    assert items == [{"filename": f"{stem}_{n:05}_.png", "subfolder": subfolder, "type": "output"} for n in (1, 2)]
    pixels = []
    for item in items:
        text, arr = _png(server, item)
        assert text[CHUNK] == receipt  # verbatim
        assert _as_queued(json.loads(text["prompt"])) == graph
        assert json.loads(text["workflow"]) == WORKFLOW and json.loads(text["note"]) == "kept"
        assert _sidecar(server, item).decode() == receipt
        assert arr.shape == (128, 128, 3)
        pixels.append(arr)
    assert np.abs(pixels[0][:, ::-1].astype(int) - pixels[1]).mean() < 3  # the mirror, not the same image twice

    plain = entry["outputs"]["7"]["images"][0]
    assert _png(server, plain)[0][CHUNK] == receipt and _sidecar(server, plain) is None


def test_without_a_receipt_it_saves_what_core_save_image_saves(server):
    prefix = _prefix("plain")
    graph = _graph(prefix, receipt_file=True)  # nothing to write beside it without a receipt
    graph["8"] = {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": prefix + "_core"}}
    entry = _queue(server, graph, {"workflow": WORKFLOW})
    ComfyServer.raise_for_status(entry)
    (ours,), (core,) = entry["outputs"]["5"]["images"], entry["outputs"]["8"]["images"]
    assert set(ours) == set(core) == {"filename", "subfolder", "type"} and ours["type"] == core["type"] == "output"
    (ours_text, ours_px), (core_text, core_px) = _png(server, ours), _png(server, core)
    assert ours_text == core_text and set(ours_text) == {"prompt", "workflow"}
    assert np.array_equal(ours_px, core_px)
    assert _sidecar(server, ours) is None


def test_a_receipt_that_is_not_json_is_an_error_naming_it_then_the_server_serves(server):
    prefix = _prefix("bad")
    graph = _graph(prefix, receipt=["9", 0])
    graph["9"] = {"class_type": "PrimitiveString", "inputs": {"value": "upscaled 4x, looks fine"}}
    entry = _queue(server, graph)
    assert ComfyServer.outcome(entry) == "error"
    err = ComfyServer.execution_error(entry)
    assert err["node_type"] == "DreamForgeSaveImage" and err["node_id"] == "5", err
    assert err["exception_type"].endswith("ValueError"), err["exception_type"]
    message = err["exception_message"]
    assert message.startswith("receipt:") and "not JSON" in message and "Connect the node's 'receipt' output" in message
    assert not list((server.output_dir / "receipts").glob(prefix.rsplit("/", 1)[1] + "*"))  # nothing half-saved

    good = _prefix("after_bad")
    entry = _queue(server, _graph(good, receipt=["4", 1]))
    ComfyServer.raise_for_status(entry)
    (item,) = entry["outputs"]["5"]["images"]
    assert _png(server, item)[0][CHUNK] == entry["outputs"]["6"]["text"][0]


def test_disable_metadata_drops_the_chunks_but_the_sidecar_keeps_the_receipt(tmp_path):
    """The node's execute under ComfyUI's --disable-metadata flag, in a fresh interpreter that imports
    ComfyUI (never this process)."""
    try:
        comfy_dir = comfyui_dir()
    except FileNotFoundError as exc:
        pytest.skip(f"real ComfyUI not installed: {exc}")
    receipt = json.dumps({"note": "a stand-in: the node checks only that it is JSON"})
    code = (
        f"import sys; sys.path[:0] = [{str(comfy_dir)!r}, {str(REPO / 'tests')!r}]\n"
        "from comfy.cli_args import args; args.cpu = True\n"
        "import json, torch, folder_paths\n"
        "from comfy_api.latest import io\n"
        "from pack_as_custom_node import load_pack\n"
        "node = load_pack('dreamforge_pack').nodes.save_nodes.SaveImageReceipt\n"
        f"folder_paths.set_output_directory({str(tmp_path)!r})\n"
        "hidden = {io.Hidden.prompt: {'1': {'class_type': 'X', 'inputs': {}}},\n"
        "          io.Hidden.extra_pnginfo: {'workflow': {}}}\n"
        "for flag in (True, False):\n"
        "    args.disable_metadata = flag\n"
        "    out = node.PREPARE_CLASS_CLONE(hidden).execute(images=torch.rand(2, 8, 8, 3),\n"
        f"        filename_prefix=f'meta_{{flag}}', receipt={receipt!r}, receipt_file=True)\n"
        "    print(json.dumps(out.ui))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=comfy_dir)
    assert done.returncode == 0, done.stderr[-4000:]
    without, with_ = (json.loads(line) for line in done.stdout.strip().splitlines()[-2:])
    for ui, chunks in ((without, set()), (with_, {"prompt", "workflow", CHUNK})):
        assert len(ui["images"]) == 2
        for item in ui["images"]:
            path = tmp_path / item["subfolder"] / item["filename"]
            with Image.open(path) as im:
                assert set(im.text) == chunks
            assert path.with_suffix(".json").read_text() == receipt
