"""The V3 port through real ComfyUI 0.3.75 servers.

- Every node's /object_info input spec equals the V1 one saved before the port
  (tests/data/object_info_v1.json), so saved workflows and API twins keep loading unchanged.
- Every DreamForge node is registered as a V3 class (io.ComfyNode) inside the server.
- Inputs marked advanced and search aliases in the form newer ComfyUI reads are harmless on 0.3.75.
- Tiled Upscale's validate_inputs lists every problem while keeping ComfyUI's own checks.
- Previews follow the server's --preview-method: none on the session server (a real API client once
  took a preview frame for the result), every Chain-of-Zoom state on a second server started with
  `--preview-method auto`.
"""
from __future__ import annotations

import copy
import io
import json
import struct
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from comfy_headless import ComfyServer, comfyui_dir  # noqa: E402 - conftest puts scripts/ on sys.path
from object_info_compare import input_differences

REPO = Path(__file__).resolve().parents[1]
SNAPSHOT = json.loads((REPO / "tests" / "data" / "object_info_v1.json").read_text())
WORKFLOWS = REPO / "example_workflows" / "api"
PREVIEW_IMAGE_EVENT = 1  # BinaryEventTypes.PREVIEW_IMAGE (the server encodes our frames to JPEG)
CLIENT_IMAGE = "client_72x56.png"  # the size the third-party client was given when it went wrong
ADVANCED = {
    "DreamForgeESRGANUpscale": ("overlap", "resample"),
    # Tiled Upscale: besides the tiling details, every input a GAN run ignores (newer frontends fold them away)
    "DreamForgeTiledUpscale": ("overlap", "resample", "prompt", "negative_prompt", "seed", "steps", "guidance",
                               "noise_level", "sampling"),
    "DreamForgeSDX4Upscale": ("overlap", "vae_tile"), "DreamForgeLoadUpscaler": ("attention_slicing", "cpu_offload"),
    "DreamForgeCoZUpscale": ("overlap", "resample", "max_side"), "DreamForgeLoadTagger": ("threshold_offset",),
}


def _ours(info: dict) -> dict:
    return {k: v for k, v in info.items() if k.startswith("DreamForge") and not k.startswith("DreamForgeTest")}


def _all_inputs(node_info: dict) -> dict:
    return {**node_info["input"]["required"], **node_info["input"].get("optional", {})}


def _in_comfy_process(code: str) -> str:
    """Run `code` in a fresh interpreter that can import ComfyUI, with the pack imported as `pack`, so
    ComfyUI's modules never load into the pytest process."""
    prelude = (f"import sys; sys.path[:0] = [{str(comfyui_dir())!r}, {str(REPO / 'tests')!r}]\n"
               "from comfy.cli_args import args; args.cpu = True  # as the test servers run\n"
               "from pack_as_custom_node import load_pack\n"
               "pack = load_pack('dreamforge_pack')\n")
    done = subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=300,
                          cwd=comfyui_dir())
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


# ------------------------------------------------------------------------------- schema, unchanged
def test_object_info_equals_the_v1_snapshot(comfy):
    info = _ours(comfy.object_info())
    assert sorted(info) == sorted(SNAPSHOT)
    problems = [p for node in sorted(SNAPSHOT) for p in input_differences(node, SNAPSHOT[node], info[node])]
    assert problems == []


def test_the_comparison_catches_what_would_break_a_saved_workflow():
    old = SNAPSHOT["DreamForgeTiledUpscale"]
    changes = {
        "default": lambda n: n["input"]["required"]["scale"][1].update(default=2.0),
        "max": lambda n: n["input"]["required"]["tile"][1].update(max=4096),
        "step": lambda n: n["input"]["required"]["overlap"][1].update(step=8),
        "choices": lambda n: n["input"]["required"]["impl"][0].reverse(),
        "order": lambda n: n["input_order"]["required"].reverse(),
        "type": lambda n: n["input"]["required"].update(upscaler=["UPSCALE_MODEL", {}]),
        "renamed": lambda n: n["input"]["optional"].update(cfg=n["input"]["optional"].pop("guidance")),
        "widget kind": lambda n: n["input"]["optional"]["prompt"][1].pop("multiline"),
        "control_after_generate": lambda n: n["input"]["optional"]["seed"][1].pop("control_after_generate"),
        "output name": lambda n: n["output_name"].reverse(),
        "unknown key": lambda n: n["input"]["required"]["tile"][1].update(display="slider"),
        "added input": lambda n: n["input"]["optional"].update(cfg=["FLOAT", {"default": 1.0}]),
        "added, no default": lambda n: (n["input"]["optional"].update(sampling=[["sample", "mean"], {}]),
                                        n["input_order"]["optional"].append("sampling")),
        "added before a widget": lambda n: (n["input"]["optional"].update(sampling=[["sample", "mean"],
                                                                                    {"default": "sample"}]),
                                            n["input_order"]["optional"].insert(0, "sampling")),
    }
    for what, change in changes.items():
        new = copy.deepcopy(old)
        change(new)
        assert input_differences("DreamForgeTiledUpscale", old, new), what
    assert input_differences("DreamForgeTiledUpscale", old, copy.deepcopy(old)) == []


def test_every_pack_node_is_a_v3_node_in_the_server(comfy):
    entry = comfy.run({"1": {"class_type": "DreamForgeTestNodeKinds", "inputs": {}}}, timeout=60)
    kinds = entry["outputs"]["1"]["kinds"][0]
    assert kinds == {node: "v3" for node in SNAPSHOT}
    assert comfy.import_failures("dreamforge-upscale-test") == []


def test_outside_comfyui_the_pack_exposes_no_nodes():
    # a fresh interpreter: earlier tests of the suite may have put ComfyUI on this process's path
    code = (
        "import importlib.util, sys; from pack_as_custom_node import load_pack\n"
        "assert importlib.util.find_spec('comfy') is None, 'ComfyUI is on the path'\n"
        "pack = load_pack('dreamforge_outside')\n"
        "assert pack.__all__ == [] and not hasattr(pack, 'comfy_entrypoint')\n"
        "assert not hasattr(pack, 'NODE_CLASS_MAPPINGS')\n"
        "assert 'dreamforge_outside.nodes' not in sys.modules\n"
        "print('no nodes')\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "no nodes" in done.stdout, done.stderr[-2000:]


# ------------------------------------------------------------------------------- newer-ComfyUI extras
def test_advanced_inputs_are_marked_and_the_nodes_still_run_on_0_3_75(comfy):
    info = _ours(comfy.object_info())
    for node, names in ADVANCED.items():
        inputs = _all_inputs(info[node])
        assert all(inputs[n][1].get("advanced") is True for n in names), node
        assert [n for n, spec in inputs.items() if n not in names and len(spec) > 1 and spec[1].get("advanced")] == []
    assert not any("search_aliases" in node for node in info.values())  # 0.3.75's Schema has no such field
    graph = json.loads((WORKFLOWS / "upscale_bundled_x4.json").read_text())
    upscale = next(n for n in graph.values() if n["class_type"] == "DreamForgeESRGANUpscale")
    upscale["inputs"].update(overlap=24, resample="bicubic", scale=2.0)
    for node in graph.values():
        if node["class_type"] == "LoadImage":
            node["inputs"]["image"] = "coffee_64.png"
    entry = comfy.run(graph, timeout=120)
    saved = comfy.output_images(entry)
    assert saved and all(Image.open(p).size == (128, 128) for p in saved)


def test_inside_comfyui_the_pack_is_a_v3_extension_with_aliases_where_the_schema_has_them():
    out = _in_comfy_process(
        "import asyncio, dataclasses, json\n"
        "from comfy_api.v0_0_2 import ComfyExtension, io\n"
        "assert not hasattr(pack, 'NODE_CLASS_MAPPINGS')  # else ComfyUI takes the V1 path\n"
        "extension = asyncio.run(pack.comfy_entrypoint())\n"
        "assert isinstance(extension, ComfyExtension)\n"
        "nodes = asyncio.run(extension.get_node_list())\n"
        "plain = {n.define_schema().node_id: hasattr(n.define_schema(), 'search_aliases') for n in nodes}\n"
        "@dataclasses.dataclass\n"
        "class NewerSchema(io.Schema):  # what newer ComfyUI's Schema has\n"
        "    search_aliases: list = None\n"
        "io.Schema = NewerSchema\n"
        "newer = {n.define_schema().node_id: n.define_schema().search_aliases for n in nodes}\n"
        "print(json.dumps({'plain': plain, 'newer': newer}))\n")
    result = json.loads(out.strip().splitlines()[-1])
    assert set(result["plain"]) == set(SNAPSHOT) and not any(result["plain"].values())
    newer = result["newer"]
    assert all(newer[node] for node in SNAPSHOT), newer
    assert {"real-esrgan", "esrgan", "4x"} <= set(newer["DreamForgeESRGANUpscale"])
    assert {"color fix", "colour fix"} <= set(newer["DreamForgeColorFix"])
    assert {"sd upscaler"} <= set(newer["DreamForgeSDX4Upscale"])
    assert {"chain of zoom", "coz"} <= set(newer["DreamForgeCoZLoop"]) & set(newer["DreamForgeCoZUpscale"])


def test_pyproject_declares_the_minimum_comfyui_the_way_comfyui_reads_it():
    out = _in_comfy_process(
        "from comfy_config import config_parser\n"
        f"c = config_parser.extract_node_configuration({str(REPO)!r})\n"
        "print(c.project.version, c.project.supported_comfyui_version, c.project.supported_os)\n")
    version, requires, *_ = out.strip().splitlines()[-1].split(" ", 2)
    assert (version, requires) == ("0.2.0", ">=0.3.75")


# ------------------------------------------------------------------------------- queue-time validation
def test_tiled_upscale_lists_every_problem_at_queue_time(comfy):
    graph = json.loads((WORKFLOWS / "tiled_upscale_2x.json").read_text())
    node_id, node = next((k, n) for k, n in graph.items() if n["class_type"] == "DreamForgeTiledUpscale")
    node["inputs"].update(impl="bogus", scale=1000.0, strict_scale=True)
    status, body = comfy.post_prompt(graph)
    assert status == 400, body
    details = " ".join(e["details"] for e in body["node_errors"][node_id]["errors"])
    assert "impl: 'bogus' is not one of auto, diffusion, gan" in details
    assert "scale: 1000.0 is bigger than the maximum 16.0" in details
    node["inputs"].update(impl="diffusion", scale=2.0, tile=-8)  # strict_scale's own check + a core range check
    status, body = comfy.post_prompt(graph)
    assert status == 400, body
    errors = body["node_errors"][node_id]["errors"]
    assert any(e["type"] == "custom_validation_failed" and "strict_scale" in e["details"] for e in errors)
    assert any(e["type"] == "value_smaller_than_min" and e["details"] == "tile" for e in errors)


# ------------------------------------------------------------------------------- previews
def _client_run(server: ComfyServer, graph: dict, timeout: float = 180) -> tuple[dict, list[bytes], list[dict]]:
    """What a websocket API client sees: the history entry, the binary frames and the JSON messages."""
    ws = server.listen()
    try:
        prompt_id = server.queue(graph)
        entry = server.wait(prompt_id, timeout=timeout)
        time.sleep(0.3)  # the last frames trail the history entry
        frames, events = list(ws.binary), ws.snapshot()
    finally:
        ws.close()
    ComfyServer.raise_for_status(entry)
    previews = [f for f in frames if struct.unpack(">I", f[:4])[0] == PREVIEW_IMAGE_EVENT]
    return entry, previews, [e for e in events if e.get("data", {}).get("prompt_id") == prompt_id]


def _coz_upscale_for_client(image: str) -> dict:
    graph = json.loads((WORKFLOWS / "coz_upscale_2_5x.json").read_text())
    graph["1"]["inputs"]["image"] = image
    graph["4"]["inputs"]["filename_prefix"] = f"client_{uuid.uuid4().hex[:8]}"
    return graph


def _client_image(server: ComfyServer) -> None:
    rng = np.random.default_rng(13)
    server.add_input_image(rng.integers(0, 256, (56, 72, 3), dtype=np.uint8), CLIENT_IMAGE)


@pytest.fixture(scope="module")
def preview_server(tmp_path_factory):
    """A second, small server with --preview-method auto (the session server runs with core's default)."""
    try:
        comfyui_dir()
    except FileNotFoundError as exc:
        pytest.skip(f"real ComfyUI not installed: {exc}")
    server = ComfyServer(tmp_path_factory.mktemp("comfyui-previews"), extra_args=["--preview-method", "auto"])
    _client_image(server)
    server.start(timeout=180)
    yield server
    server.stop()


def test_without_a_preview_method_an_api_client_gets_only_the_result(comfy):
    _client_image(comfy)
    entry, previews, events = _client_run(comfy, _coz_upscale_for_client(CLIENT_IMAGE))
    assert previews == []  # what a client collecting streamed images would have taken for the result
    assert any(e["type"] == "progress" and e["data"]["node"] == "3" for e in events)  # progress still moves
    (saved,) = comfy.output_images(entry)
    assert Image.open(saved).size == (180, 140)


def test_with_a_preview_method_every_zoom_state_is_previewed(preview_server):
    _, previews, _ = _client_run(preview_server, _coz_upscale_for_client(CLIENT_IMAGE))
    assert len(previews) == 1  # one 4x pass
    frame = Image.open(io.BytesIO(previews[0][8:]))
    assert frame.format == "JPEG" and frame.size == (288, 224)  # the pass result, before the exact resize
    loop = json.loads((WORKFLOWS / "coz_loop_gan.json").read_text())
    loop["1"]["inputs"]["image"] = CLIENT_IMAGE
    loop["3"]["inputs"].update(steps=2, process_size=64, mode="recursive")
    loop["4"]["inputs"]["filename_prefix"] = f"loop_{uuid.uuid4().hex[:8]}"
    entry, previews, _ = _client_run(preview_server, loop)
    frames = [Image.open(io.BytesIO(f[8:])) for f in previews]
    assert [f.size for f in frames] == [(64, 64)] * 3  # x0, x1, x2
    x1, x2 = (np.asarray(Image.open(p).convert("RGB"), np.int16) for p in preview_server.output_images(entry)[-2:])
    last = np.asarray(frames[-1].convert("RGB"), np.int16)
    # the JPEG of x2 (a noise input is JPEG's worst case: ~5 levels of mean error), not of another state
    assert np.abs(last - x2).mean() < 10 and np.abs(last - x2).mean() < np.abs(last - x1).mean()
