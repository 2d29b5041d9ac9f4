"""Model discovery inside a real ComfyUI 0.3.75 server (its own instance, not the shared `comfy` one).

The server starts with --extra-model-paths-config pointing at a folder outside ComfyUI,
DF_LOCAL_MIRROR at a mirror folder and DF_MODELS_ROOT at a models root the library installed a model
into (over loopback HTTP, so it has a provenance sidecar). Each holds a copy of the bundled Compact
model under its own name: the loader's combo must list all of them and a prompt must run with each.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from asset_server import AssetServer, sha256  # noqa: E402 - conftest puts tests/ on sys.path
from comfy_headless import ComfyServer, comfyui_dir  # noqa: E402 - conftest puts scripts/ on sys.path
from dreamforge_upscale.assets.catalog import AssetSpec
from dreamforge_upscale.assets.discovery import Locations, install

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "assets" / "bundled" / "realesr-animevideov3.pth"
TEST_NODES = Path(__file__).resolve().parent / "comfy_test_nodes"


def combo(spec: list) -> list:
    return spec[0] if isinstance(spec[0], list) else spec[1]["options"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    try:
        comfyui_dir()
    except FileNotFoundError as exc:
        pytest.skip(f"real ComfyUI not installed: {exc}")
    tmp = tmp_path_factory.mktemp("assets-comfy")
    elsewhere = tmp / "elsewhere"
    (elsewhere / "ups").mkdir(parents=True)
    shutil.copyfile(BUNDLED, elsewhere / "ups" / "extra_compact.pth")
    yaml = tmp / "extra_model_paths.yaml"
    yaml.write_text(f"dreamforge_test_extra:\n    base_path: {elsewhere}\n    upscale_models: ups\n")
    mirror = tmp / "mirror"
    mirror.mkdir()
    shutil.copyfile(BUNDLED, mirror / "mirror_compact.pth")
    root = tmp / "root"
    with AssetServer() as http:  # "prefetch" into the models root, as the command line does
        url = http.add("/releases/root_compact.pth", BUNDLED.read_bytes())
        spec = AssetSpec("root-compact", "registry_model", "upscale_models", "root_compact.pth", url=url,
                         sha256=sha256(BUNDLED.read_bytes()))
        install(spec, Locations.standalone(root, use_cache=False), progress=False)

    server = ComfyServer(tmp / "base", extra_nodes={"dreamforge_test_nodes": TEST_NODES},
                         extra_args=["--extra-model-paths-config", str(yaml)],
                         env={"DF_LOCAL_MIRROR": str(mirror), "DF_MODELS_ROOT": str(root),
                              "TORCH_HOME": str(tmp / "torch")})
    pixels = (np.indices((24, 24)).sum(0) * 5 % 256).astype(np.uint8)
    server.add_input_image(np.stack([pixels, pixels[::-1], pixels.T], -1), "grad_24.png")
    server.start(timeout=240)
    yield {"server": server, "url": url, "elsewhere": elsewhere}
    server.stop()


def test_loader_lists_models_from_extra_paths_mirror_and_models_root(setup):
    server = setup["server"]
    assert f"Adding extra search path upscale_models {setup['elsewhere'] / 'ups'}" in server.log_text()
    info = server.object_info()
    ours = combo(info["DreamForgeLoadUpscaler"]["input"]["required"]["model_name"])
    assert {"extra_compact.pth", "mirror_compact.pth", "root_compact.pth", "realesr-animevideov3.pth"} <= set(ours)
    assert not any(name.endswith(".json") for name in ours)  # sidecars are not models
    core = combo(info["UpscaleModelLoader"]["input"]["required"]["model_name"])
    assert {"extra_compact.pth", "root_compact.pth"} <= set(core)  # the models root is a ComfyUI folder too
    assert "mirror_compact.pth" not in core  # the mirror is read by DreamForge's loader only


def test_prompts_run_with_each_discovered_model_and_receipts_quote_provenance(setup):
    server = setup["server"]
    nodes, n = {}, 0

    def add(class_type, **inputs):
        nonlocal n
        n += 1
        nodes[str(n)] = {"class_type": class_type, "inputs": inputs}
        return str(n)

    image = add("LoadImage", image="grad_24.png")
    outs = {}
    for name in ("extra_compact.pth", "mirror_compact.pth", "root_compact.pth"):
        load = add("DreamForgeLoadUpscaler", model_name=name, impl="auto", dtype="auto")
        up = add("DreamForgeESRGANUpscale", image=[image, 0], upscale_model=[load, 0], scale=0.0, tile=0,
                 overlap=16, resample="lanczos")
        outs[name] = (add("SaveImage", images=[up, 0], filename_prefix=f"assets_{name[:-4]}"),
                      add("DreamForgeTestSaveText", text=[up, 1], filename_prefix=f"assets_receipt_{name[:-4]}"))
    entry = server.run(nodes, timeout=180)
    for name, (img_node, txt_node) in outs.items():
        (path,) = server.output_images({"outputs": {img_node: entry["outputs"][img_node]}})
        with Image.open(path) as im:
            assert im.size == (96, 96), name
        receipt = json.loads(entry["outputs"][txt_node]["text"][0])
        assert receipt["model"]["file"] == name
        assert receipt["model"]["sha256"] == sha256(BUNDLED.read_bytes())[:12]
        if name == "root_compact.pth":  # installed with a sidecar: the receipt says where it came from
            assert receipt["model"]["provenance"]["source"] == setup["url"]
            assert receipt["model"]["provenance"]["matches_sidecar"] is True
        else:
            assert receipt["model"]["provenance"] is None
