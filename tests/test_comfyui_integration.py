"""The pack inside a real, unmodified ComfyUI 0.3.75 (CPU), driven over its HTTP API.

One server for the session (the `comfy` fixture in comfy_fixtures.py): the pack is installed as
custom_nodes/dreamforge-upscale-test (a symlink, so a folder name unlike the repository's), next to
the test-only nodes in tests/comfy_test_nodes. Inputs are real photos from scikit-image, cropped
small; the bundled Compact model does the work except where the RRDB model is the point.
"""
from __future__ import annotations

import hashlib
import json
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from comfy_headless import ComfyServer  # noqa: E402 - conftest puts scripts/ on sys.path

REPO = Path(__file__).resolve().parents[1]
BUNDLED = "realesr-animevideov3.pth"
OUR_NODES = ("DreamForgeLoadUpscaler", "DreamForgeESRGANUpscale", "DreamForgeTiledUpscale", "DreamForgeColorFix")
PACK_FOLDER = "dreamforge-upscale-test"


# ------------------------------------------------------------------------------------- helpers
class Graph:
    """An API-format prompt built node by node; add() returns the node id."""

    def __init__(self):
        self.nodes: dict[str, dict] = {}

    def add(self, class_type: str, **inputs) -> str:
        node_id = str(len(self.nodes) + 1)
        self.nodes[node_id] = {"class_type": class_type, "inputs": inputs}
        return node_id


def out(node_id: str, index: int = 0) -> list:
    return [node_id, index]


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def loader(g: Graph, model: str = BUNDLED, impl: str = "auto", dtype: str = "auto") -> str:
    return g.add("DreamForgeLoadUpscaler", model_name=model, impl=impl, dtype=dtype)


def esrgan(g: Graph, image, model, scale: float = 0.0, tile: int = 0, overlap: int = 16,
           resample: str = "lanczos") -> str:
    return g.add("DreamForgeESRGANUpscale", image=image, upscale_model=model, scale=scale, tile=tile,
                 overlap=overlap, resample=resample)


def save(g: Graph, image, prefix: str) -> str:
    return g.add("SaveImage", images=image, filename_prefix=prefix)


def save_text(g: Graph, text, prefix: str) -> str:
    return g.add("DreamForgeTestSaveText", text=text, filename_prefix=prefix)


def images_of(comfy: ComfyServer, entry: dict, node_id: str) -> list[Path]:
    return comfy.output_images({"outputs": {node_id: entry["outputs"][node_id]}})


def read_png(path: Path) -> tuple[np.ndarray, str]:
    with Image.open(path) as im:
        im.load()
        return np.asarray(im).astype(np.int16), im.mode


def receipt_of(comfy: ComfyServer, entry: dict, node_id: str) -> dict:
    """The receipt as the test SaveText node reported it, checked against the JSON file it wrote."""
    ui = entry["outputs"][node_id]
    receipt = json.loads(ui["text"][0])
    written = comfy.output_files({"outputs": {node_id: ui}}, "files")
    assert len(written) == 1 and json.loads(written[0].read_text()) == receipt
    return receipt


def input_size(comfy: ComfyServer, name: str) -> tuple[int, int]:
    with Image.open(comfy.input_dir / name) as im:
        return im.size  # (width, height)


def combo_options(spec: list) -> list:
    """Options of a combo input in /object_info (classic [[...], {...}] or V3 ["COMBO", {"options"}])."""
    if isinstance(spec[0], list):
        return spec[0]
    assert spec[0] == "COMBO", spec
    return spec[1]["options"]


def good_run(comfy: ComfyServer, tag: str, scale: float) -> None:
    """A small prompt that must succeed (the server recovered); the scale makes the upscale re-run."""
    g = Graph()
    img = g.add("LoadImage", image="coffee_64.png")
    up = esrgan(g, out(img), out(loader(g)), scale=scale)
    s = save(g, out(up), unique(f"recover_{tag}"))
    entry = comfy.run(g.nodes, timeout=120)
    (path,) = images_of(comfy, entry, s)
    arr, _ = read_png(path)
    assert arr.shape[:2] == (round(64 * scale), round(64 * scale))


def sha12(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


# ------------------------------------------------------------------------------------- loading
def test_pack_imports_without_error_under_another_folder_name(comfy):
    log = comfy.log_text()
    assert (comfy.custom_nodes_dir / PACK_FOLDER).resolve() == REPO
    assert comfy.import_failures(PACK_FOLDER) == []
    assert comfy.import_failures("dreamforge_test_nodes") == []
    # ComfyUI lists every custom node folder it imported, with its time; a failure says IMPORT FAILED there
    timing = [line for line in log.splitlines() if "seconds" in line and line.rstrip().endswith("/" + PACK_FOLDER)]
    assert timing and "IMPORT FAILED" not in timing[0], timing
    info = comfy.object_info("DreamForgeLoadUpscaler")
    assert info["python_module"] == f"custom_nodes.{PACK_FOLDER}"


def test_object_info_lists_the_nodes_and_the_bundled_model(comfy):
    info = comfy.object_info()
    for name in OUR_NODES:
        assert name in info, f"{name} missing from /object_info"
        assert info[name]["category"] == "DreamForge/upscale"
        assert "DreamForge" in info[name]["display_name"]
    ours = combo_options(info["DreamForgeLoadUpscaler"]["input"]["required"]["model_name"])
    core = combo_options(info["UpscaleModelLoader"]["input"]["required"]["model_name"])
    assert BUNDLED in ours and BUNDLED in core
    # the bundled model comes from the pack, not from models/upscale_models
    assert not (comfy.upscale_models_dir / BUNDLED).exists()
    assert info["DreamForgeLoadUpscaler"]["output"] == ["UPSCALER", "UPSCALE_MODEL"]
    assert combo_options(info["DreamForgeLoadUpscaler"]["input"]["required"]["impl"]) == ["auto", "diffusion", "gan"]
    assert info["DreamForgeESRGANUpscale"]["output"] == ["IMAGE", "STRING"]


# ------------------------------------------------------------------------------------- upscaling
@pytest.mark.parametrize("scale", [0.0, 2.5])
def test_load_upscale_colorfix_save_gives_exact_size(comfy, scale):
    name = "chelsea_97x75.png"
    w, h = input_size(comfy, name)
    g = Graph()
    img = g.add("LoadImage", image=name)
    up = esrgan(g, out(img), out(loader(g)), scale=scale)
    fix = g.add("DreamForgeColorFix", image=out(up), reference=out(img), method="wavelet")
    s = save(g, out(fix), unique("esrgan"))
    t = save_text(g, out(up, 1), unique("esrgan_receipt"))
    entry = comfy.run(g.nodes, timeout=120)

    (path,) = images_of(comfy, entry, s)
    arr, mode = read_png(path)
    factor = scale or 4
    expect_w, expect_h = round(w * factor), round(h * factor)
    assert mode == "RGB" and arr.shape == (expect_h, expect_w, 3)
    # the output is the photo, enlarged: shrunk back it matches the input closely
    back = np.asarray(Image.open(path).resize((w, h), Image.Resampling.BOX)).astype(np.int16)
    src, _ = read_png(comfy.input_dir / name)
    assert np.abs(back - src).mean() < 8, np.abs(back - src).mean()

    receipt = receipt_of(comfy, entry, t)
    assert receipt["impl"] == "gan"
    assert receipt["model"]["file"] == BUNDLED
    assert receipt["model"]["sha256"] == sha12(REPO / "assets" / "bundled" / BUNDLED)
    assert receipt["output_size"] == [expect_w, expect_h] and receipt["input_size"] == [w, h]
    assert receipt["native_scale"] == 4 and receipt["device"] == "cpu" and receipt["dtype"] == "fp32"
    assert (receipt["resampled"] is None) == (scale == 0.0)


def test_tiled_upscale_forced_small_tiles_is_seam_free(comfy):
    name = "astronaut_192.png"  # a tile's window (tile + 2 x 32 px context) must be smaller than the image
    g = Graph()
    img = g.add("LoadImage", image=name)
    model = loader(g)
    tiled = g.add("DreamForgeTiledUpscale", image=out(img), upscaler=out(model), impl="auto", scale=4.0, strict_scale=True,
                  tile=64, overlap=16, resample="lanczos")
    whole = esrgan(g, out(img), out(model), tile=0)
    s_tiled = save(g, out(tiled), unique("tiled"))
    s_whole = save(g, out(whole), unique("untiled"))
    t_tiled = save_text(g, out(tiled, 1), unique("tiled_receipt"))
    t_whole = save_text(g, out(whole, 1), unique("untiled_receipt"))
    entry = comfy.run(g.nodes, timeout=180)

    (p_tiled,) = images_of(comfy, entry, s_tiled)
    (p_whole,) = images_of(comfy, entry, s_whole)
    a_tiled, _ = read_png(p_tiled)
    a_whole, _ = read_png(p_whole)
    assert a_tiled.shape == a_whole.shape == (768, 768, 3)
    receipt = receipt_of(comfy, entry, t_tiled)
    assert receipt["impl"] == "gan"
    (tiled_pass,) = receipt["passes"]
    assert tiled_pass["tiles"]["count"] > 1, tiled_pass["tiles"]
    assert max(tiled_pass["tiles"]["tile"]) <= 64  # equal tiles of at most the requested side
    assert receipt_of(comfy, entry, t_whole)["passes"][0]["tiles"]["count"] == 1
    # tiles read real context (32 px for Compact): the tiled output matches the one-pass output
    diff = np.abs(a_tiled - a_whole)
    assert diff.max() <= 2, (diff.max(), diff.mean())


def test_core_and_pack_models_interoperate_with_matching_pixels(comfy):
    """core loader -> our upscale, our loader's UPSCALE_MODEL -> core upscale, and core -> core."""
    name = "astronaut_128.png"
    g = Graph()
    img = g.add("LoadImage", image=name)
    core_model = g.add("UpscaleModelLoader", model_name=BUNDLED)
    ours_model = loader(g)
    a = esrgan(g, out(img), out(core_model))  # ComfyUI's UPSCALE_MODEL into our node
    b = g.add("ImageUpscaleWithModel", upscale_model=out(ours_model, 1), image=out(img))  # ours into core
    c = g.add("ImageUpscaleWithModel", upscale_model=out(core_model), image=out(img))  # reference: core only
    d = esrgan(g, out(img), out(ours_model))  # ours only
    saves = {k: save(g, out(n), unique(f"interop_{k}")) for k, n in dict(a=a, b=b, c=c, d=d).items()}
    t_a = save_text(g, out(a, 1), unique("interop_receipt"))
    entry = comfy.run(g.nodes, timeout=180)

    arrays = {}
    for key, node in saves.items():
        (path,) = images_of(comfy, entry, node)
        arrays[key], _ = read_png(path)
        assert arrays[key].shape == (512, 512, 3), key
    for key in "abd":
        diff = np.abs(arrays[key] - arrays["c"])
        assert diff.max() <= 2, (key, int(diff.max()), float(diff.mean()))
    receipt = receipt_of(comfy, entry, t_a)
    assert receipt["model"]["file"] == "UPSCALE_MODEL (ComfyUI loader)"
    assert "Compact" in receipt["model"]["architecture"]  # spandrel: "RealESRGAN Compact"


def test_rgba_input_keeps_its_alpha(comfy):
    """SaveImage in 0.3.75 writes a 4-channel IMAGE as an RGBA PNG: the alpha must survive ours."""
    name = "astronaut_128.png"
    g = Graph()
    img = g.add("LoadImage", image=name)
    rgba = g.add("DreamForgeTestImage", image=out(img), mode="rgba", count=1)  # alpha: ramp 0..1 left to right
    up = esrgan(g, out(rgba), out(loader(g)))
    fix = g.add("DreamForgeColorFix", image=out(up), reference=out(img), method="adain")
    s = save(g, out(fix), unique("rgba"))
    t = save_text(g, out(up, 1), unique("rgba_receipt"))
    entry = comfy.run(g.nodes, timeout=120)

    (path,) = images_of(comfy, entry, s)
    arr, mode = read_png(path)
    assert mode == "RGBA" and arr.shape == (512, 512, 4)
    alpha = arr[..., 3]
    expected = np.linspace(0, 255, 512)[None, :]  # the ramp, enlarged
    assert np.abs(alpha - expected).max() <= 3, np.abs(alpha - expected).max()
    assert np.all(alpha == alpha[0:1]), "alpha must not vary along a column"
    assert receipt_of(comfy, entry, t)["alpha"] is not None
    # the colour channels are still the photo
    src, _ = read_png(comfy.input_dir / name)
    back = np.asarray(Image.fromarray(arr[..., :3].astype(np.uint8)).resize((128, 128), Image.Resampling.BOX))
    assert np.abs(back.astype(np.int16) - src).mean() < 8


def test_batch_of_two_gives_two_outputs(comfy):
    name = "coffee_64.png"
    g = Graph()
    img = g.add("LoadImage", image=name)
    batch = g.add("DreamForgeTestImage", image=out(img), mode="batch", count=2)  # [image, mirrored image]
    model = loader(g)
    up = esrgan(g, out(batch), out(model))
    single = esrgan(g, out(img), out(model))
    s = save(g, out(up), unique("batch"))
    s1 = save(g, out(single), unique("single"))
    t = save_text(g, out(up, 1), unique("batch_receipt"))
    entry = comfy.run(g.nodes, timeout=120)

    paths = images_of(comfy, entry, s)
    assert len(paths) == 2
    first, second = (read_png(p)[0] for p in paths)
    (p_single,) = images_of(comfy, entry, s1)
    alone, _ = read_png(p_single)
    assert first.shape == second.shape == alone.shape == (256, 256, 3)
    assert np.abs(first - alone).max() <= 1  # batching does not mix images
    assert np.abs(second[:, ::-1] - alone).mean() < 3  # the second is the mirrored photo
    assert np.abs(second - first).mean() > 10
    assert receipt_of(comfy, entry, t)["batch"] == 2


# ------------------------------------------------------------------------------------- errors
def _error_prompt(case: str) -> tuple[Graph, str]:
    """A prompt that must fail while executing, and the node id expected to fail."""
    g = Graph()
    img = g.add("LoadImage", image="coffee_64.png")
    if case == "empty" or case == "nan":
        bad = g.add("DreamForgeTestImage", image=out(img), mode=case, count=1)
        up = esrgan(g, out(bad), out(loader(g)))
        fail = up
    elif case == "not_a_model":
        fail = loader(g, model="not_a_model.pth")
        up = esrgan(g, out(img), out(fail))
    elif case == "sd_x4":
        fail = loader(g, model="x4-upscaler-ema.safetensors", impl="gan")
        up = esrgan(g, out(img), out(fail))
    elif case == "strict_scale":
        fail = g.add("DreamForgeTiledUpscale", image=out(img), upscaler=out(loader(g)), impl="auto", scale=2.0,
                     strict_scale=True, tile=0, overlap=16, resample="lanczos")
        up = fail
    elif case == "impl_diffusion":
        fail = loader(g, impl="diffusion")
        up = esrgan(g, out(img), out(fail))
    else:
        raise AssertionError(case)
    save(g, out(up), unique(f"err_{case}"))
    return g, fail


ERROR_CASES = {
    # case: (expected node type, phrases the message must contain)
    "empty": ("DreamForgeESRGANUpscale", ["empty"]),
    "nan": ("DreamForgeESRGANUpscale", ["NaN"]),
    "not_a_model": ("DreamForgeLoadUpscaler", ["not_a_model.pth", "could not be read as model weights"]),
    "sd_x4": ("DreamForgeLoadUpscaler", ["x4-upscaler-ema.safetensors is the Stable Diffusion x4 upscaler",
                                         "'diffusion'"]),
    "strict_scale": ("DreamForgeTiledUpscale", ["strict_scale", "scale 2"]),
    "impl_diffusion": ("DreamForgeLoadUpscaler", ["impl 'diffusion' needs the Stable Diffusion x4 upscaler",
                                                  f"{BUNDLED} is a GAN model"]),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_bad_input_gives_clear_execution_error_then_server_recovers(comfy, case):
    node_type, phrases = ERROR_CASES[case]
    g, failing = _error_prompt(case)
    entry = comfy.wait(comfy.queue(g.nodes), timeout=120)
    assert ComfyServer.outcome(entry) == "error"
    err = ComfyServer.execution_error(entry)
    assert err is not None, ComfyServer.messages(entry)
    assert err["node_type"] == node_type and err["node_id"] == failing, err
    assert err["exception_type"].endswith("UpscalerError"), err["exception_type"]
    for phrase in phrases:
        assert phrase in err["exception_message"], err["exception_message"]
    good_run(comfy, case, scale=1.0 + 0.25 * (list(ERROR_CASES).index(case) + 1))


def test_unknown_model_name_is_rejected_when_queued(comfy):
    g = Graph()
    img = g.add("LoadImage", image="coffee_64.png")
    model = loader(g, model="does_not_exist.pth")
    save(g, out(esrgan(g, out(img), out(model))), unique("rejected"))
    status, body = comfy.post_prompt(g.nodes)
    assert status == 400, body
    errors = body["node_errors"][model]["errors"]
    assert any(e["type"] == "value_not_in_list" and "model_name" in json.dumps(e) for e in errors), errors
    assert any("does_not_exist.pth" in json.dumps(e) for e in errors)
    good_run(comfy, "rejected", scale=0.5)


# ------------------------------------------------------------------------------------- interrupt
def test_interrupt_stops_a_long_tiled_run_between_tiles(comfy):
    # 512x512 with 32 px tiles: ~960 Compact tiles, over a minute of work on two cores
    g = Graph()
    img = g.add("LoadImage", image="astronaut_512.png")
    up = esrgan(g, out(img), out(loader(g)), tile=32, overlap=16)
    save(g, out(up), unique("interrupted"))
    ws = comfy.listen()
    try:
        prompt_id = comfy.queue(g.nodes)

        def progress(at_least):
            return lambda m: (m.get("type") == "progress" and m["data"].get("prompt_id") == prompt_id
                              and m["data"].get("node") == up and m["data"]["value"] >= at_least)

        first = ws.wait_for(progress(5), timeout=120)  # our node is running, tile by tile
        total = first["data"]["max"]
        assert total > 100, first
        asked = time.monotonic()
        assert comfy.post_interrupt() == 200
        entry = comfy.wait(prompt_id, timeout=60)
        took = time.monotonic() - asked
        ticks = [m["data"]["value"] for m in ws.snapshot()
                 if m.get("type") == "progress" and m["data"].get("prompt_id") == prompt_id and m["data"].get("node") == up]
    finally:
        ws.close()
    assert ComfyServer.outcome(entry) == "interrupted", ComfyServer.messages(entry)
    stopped = dict(ComfyServer.messages(entry))["execution_interrupted"]
    assert stopped["node_type"] == "DreamForgeESRGANUpscale" and stopped["node_id"] == up
    assert took < 30, f"interrupt took {took:.1f} s"
    assert max(ticks) < total, "the run finished instead of stopping"
    assert not entry.get("outputs"), "an interrupted run must not save an image"
    good_run(comfy, "interrupt", scale=2.0)


# ------------------------------------------------------------------------------------- real RRDB
@pytest.mark.slow
def test_realesrgan_x4plus_ours_matches_core(comfy, x4plus_name):
    """The RRDB model through our loader + upscale vs ComfyUI's own loader + upscale (one tile < 512)."""
    g = Graph()
    img = g.add("LoadImage", image="coffee_64.png")
    ours = esrgan(g, out(img), out(loader(g, model=x4plus_name)))
    core = g.add("ImageUpscaleWithModel", upscale_model=out(g.add("UpscaleModelLoader", model_name=x4plus_name)),
                 image=out(img))
    s_ours, s_core = save(g, out(ours), unique("x4plus_ours")), save(g, out(core), unique("x4plus_core"))
    t = save_text(g, out(ours, 1), unique("x4plus_receipt"))
    entry = comfy.run(g.nodes, timeout=300)
    (p_ours,), (p_core,) = images_of(comfy, entry, s_ours), images_of(comfy, entry, s_core)
    a_ours, _ = read_png(p_ours)
    a_core, _ = read_png(p_core)
    assert a_ours.shape == a_core.shape == (256, 256, 3)
    diff = np.abs(a_ours - a_core)
    assert diff.max() <= 2, (int(diff.max()), float(diff.mean()))
    receipt = receipt_of(comfy, entry, t)
    assert receipt["model"]["file"] == x4plus_name and "ESRGAN" in receipt["model"]["architecture"]
    assert receipt["model"]["sha256"] == sha12(comfy.upscale_models_dir / x4plus_name)


def test_every_pack_node_is_documented(comfy):
    """Descriptions, a tooltip on every input and output (what users read when hovering in the UI)."""
    info = comfy.object_info()
    ours = {name: node for name, node in info.items() if name.startswith("DreamForge") and "Test" not in name}
    assert len(ours) >= 10
    missing = []
    for name, node in ours.items():
        if not node.get("description"):
            missing.append(f"{name}: description")
        for section in ("required", "optional"):
            for key, spec in node["input"].get(section, {}).items():
                if not (len(spec) > 1 and spec[1].get("tooltip")):
                    missing.append(f"{name}.{key}")
        tips = node.get("output_tooltips") or []
        if len(tips) != len(node["output"]) or not all(tips):
            missing.append(f"{name}: output tooltips")
        assert node["category"].startswith("DreamForge/"), name
    assert not missing, missing
