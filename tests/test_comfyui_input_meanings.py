"""One meaning per input name, one unit per quantity, through a real ComfyUI 0.3.75 over HTTP.

- Tiled Upscale takes core's UPSCALE_MODEL as ESRGAN Upscale does (core Load Upscale Model -> Tiled Upscale).
- scale 0 = the connected model's native scale on Tiled Upscale too.
- overlap 0 = auto on every node (16 input px for a GAN, 32 for SD x4 and Chain-of-Zoom's model), the default.
- tile / overlap are input px for every upscaler, also in the Chain-of-Zoom nodes (converted for the
  latent-tiled models; the receipt gives the latent figures and their unit).
- DREAMFORGE_DEFAULT_IMPL is the default of Tiled Upscale's policy only: a new Load Upscaler still loads a GAN.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from comfy_headless import ComfyServer, comfyui_dir  # noqa: E402 - conftest puts scripts/ on sys.path
from test_comfyui_coz_sd3 import coz, load_node  # noqa: F401 - the tiny SD3 fixture
from test_comfyui_integration import (
    BUNDLED, Graph, esrgan, images_of, loader, out, read_png, receipt_of, save, save_text, unique,
)
from test_comfyui_sdx4 import crop, sdx4  # noqa: F401 - the tiny SD x4 fixture
from test_comfyui_zoom import text_of

SD_X4_SINGLE = "x4-upscaler-ema.safetensors"


def tiled(g: Graph, image, upscaler, impl="auto", scale=2.0, tile=0, overlap=0, **diffusion) -> str:
    inputs = dict(image=image, upscaler=upscaler, impl=impl, scale=scale, strict_scale=False, tile=tile,
                  overlap=overlap, resample="lanczos")
    if diffusion:
        inputs.update(prompt="coffee", negative_prompt="", seed=3, steps=2, guidance=7.5, noise_level=20,
                      **diffusion)
    return g.add("DreamForgeTiledUpscale", **inputs)


def test_tiled_upscale_takes_cores_upscale_model(comfy):
    info = comfy.object_info("DreamForgeTiledUpscale")
    assert info["input"]["required"]["upscaler"][0] == "UPSCALER,UPSCALE_MODEL"
    g = Graph()
    img = g.add("LoadImage", image="astronaut_128.png")
    core_model = g.add("UpscaleModelLoader", model_name=BUNDLED)
    from_core = tiled(g, out(img), out(core_model), scale=2.0)
    from_ours = tiled(g, out(img), out(loader(g)), scale=2.0)
    s_core, s_ours = save(g, out(from_core), unique("tiled_core")), save(g, out(from_ours), unique("tiled_ours"))
    t_core = save_text(g, out(from_core, 1), unique("tiled_core_receipt"))
    entry = comfy.run(g.nodes, timeout=180)
    (a,), (b,) = images_of(comfy, entry, s_core), images_of(comfy, entry, s_ours)
    core_pixels, ours_pixels = read_png(a)[0], read_png(b)[0]
    assert core_pixels.shape == ours_pixels.shape == (256, 256, 3)
    assert np.abs(core_pixels - ours_pixels).max() <= 2
    receipt = receipt_of(comfy, entry, t_core)
    assert receipt["model"]["file"] == "UPSCALE_MODEL (ComfyUI loader)"
    assert receipt["policy"]["ran"] == "gan" and "connected GAN" in receipt["policy"]["reason"]


def test_tiled_upscale_scale_0_is_the_models_native_scale(comfy):
    assert comfy.object_info("DreamForgeTiledUpscale")["input"]["required"]["scale"][1]["min"] == 0.0
    g = Graph()
    img = g.add("LoadImage", image="coffee_64.png")
    up = tiled(g, out(img), out(loader(g)), scale=0.0)
    s, t = save(g, out(up), unique("tiled_native")), save_text(g, out(up, 1), unique("tiled_native_receipt"))
    entry = comfy.run(g.nodes, timeout=120)
    assert read_png(images_of(comfy, entry, s)[0])[0].shape == (256, 256, 3)  # the bundled model is 4x
    receipt = receipt_of(comfy, entry, t)
    assert receipt["requested_scale"] == 4.0 and receipt["resampled"] is None


def test_overlap_0_is_auto_and_the_default_everywhere(comfy):
    info = comfy.object_info()
    for node in ("DreamForgeESRGANUpscale", "DreamForgeTiledUpscale", "DreamForgeSDX4Upscale", "DreamForgeCoZUpscale"):
        spec = info[node]["input"]["required"]["overlap"][1]
        assert spec["default"] == 0 and spec["min"] == 0 and "0 = auto: 16 for a GAN, 32 for SD x4" in spec["tooltip"]
    # a GAN: overlap 0 runs as 16 (the same pixels and tiles as 16 given), not as no blend at all
    g = Graph()
    img = g.add("LoadImage", image="astronaut_192.png")
    model = out(loader(g))
    runs = {ov: esrgan(g, out(img), model, scale=0.0, tile=64, overlap=ov) for ov in (0, 16)}
    saves = {ov: save(g, out(n), unique(f"overlap_{ov}")) for ov, n in runs.items()}
    texts = {ov: save_text(g, out(n, 1), unique(f"overlap_{ov}_receipt")) for ov, n in runs.items()}
    entry = comfy.run(g.nodes, timeout=240)
    pixels = {ov: read_png(images_of(comfy, entry, s)[0])[0] for ov, s in saves.items()}
    tiles = {ov: receipt_of(comfy, entry, t)["passes"][0]["tiles"] for ov, t in texts.items()}
    # 192 px in tiles of 64: no blend would be 3 x 3 tiles, at least 16 px of it needs 4 x 4
    assert tiles[0] == tiles[16] and tiles[0]["grid"] == [4, 4] and tiles[0]["overlap"] >= 16
    assert np.array_equal(pixels[0], pixels[16])


def test_tiled_upscale_overlap_0_on_sd_x4_is_sdx4_upscales_default(comfy, sdx4):
    g = Graph()
    model = out(loader(g, model=sdx4["single"]))
    via_tiled = tiled(g, crop(g), model, impl="diffusion", scale=4.0, tile=8, overlap=0, sampling="sample")
    via_sdx4 = g.add("DreamForgeSDX4Upscale", image=crop(g), upscaler=model, prompt="coffee", negative_prompt="",
                     seed=3, steps=2, guidance=7.5, noise_level=20, tile=8, overlap=0, vae_tile=0)
    t_tiled = save_text(g, out(via_tiled, 1), unique("sdx4_overlap_tiled"))
    t_sdx4 = save_text(g, out(via_sdx4, 1), unique("sdx4_overlap_node"))
    entry = comfy.run(g.nodes, timeout=300)
    options = [receipt_of(comfy, entry, t)["passes"][0]["backend"]["options"] for t in (t_tiled, t_sdx4)]
    assert [o["overlap"] for o in options] == [32, 32] and [o["tile"] for o in options] == [8, 8]


def test_chain_of_zoom_nodes_tile_the_latent_models_in_input_px(comfy, coz):
    """tile / overlap reach Chain-of-Zoom's own model from Chain-of-Zoom Upscale (they were dropped before),
    halved into its latent px; the receipt says the unit."""
    g = Graph()
    img = g.add("LoadImage", image="coffee_64.png")
    model = out(load_node(g, coz["folder"], clip=("(from checkpoint)", "(from checkpoint)"), t5="(from checkpoint)"))
    up = g.add("DreamForgeCoZUpscale", image=out(img), upscaler=model, scale=4.0, prompt="coffee", color_fix="none",
               seed=1, tile=48, overlap=0, resample="lanczos", max_side=8192, tile_prompts=False)
    r = g.add("PreviewAny", source=out(up, 1))
    entry = comfy.run(g.nodes, timeout=300)
    (one_pass,) = json.loads(text_of(entry, r))["passes"]
    backend = one_pass["upscale"]["passes"][0]["backend"]
    assert backend["options"]["tile"] == 24 and backend["options"]["overlap"] == 16  # latent px: input px / 2
    tiles = backend["transformer_tiles"]
    assert tiles["count"] > 1 and max(tiles["tile"]) <= 24 and tiles["unit"].startswith("latent px; 1 latent px = 2")


@pytest.fixture(scope="module")
def diffusion_default_server(tmp_path_factory):
    """A second server whose operator set DREAMFORGE_DEFAULT_IMPL=diffusion."""
    try:
        comfyui_dir()
    except FileNotFoundError as exc:
        pytest.skip(f"real ComfyUI not installed: {exc}")
    server = ComfyServer(tmp_path_factory.mktemp("comfyui-default-impl"), env={"DREAMFORGE_DEFAULT_IMPL": "diffusion"})
    server.start(timeout=180)
    yield server
    server.stop()


def test_default_impl_variable_sets_the_policy_not_load_upscalers_check(diffusion_default_server):
    server = diffusion_default_server
    info = server.object_info()
    assert info["DreamForgeTiledUpscale"]["input"]["required"]["impl"][1]["default"] == "diffusion"
    load_default = info["DreamForgeLoadUpscaler"]["input"]["required"]["impl"][1]["default"]
    assert load_default == "auto"
    # a new Load Upscaler (every widget at its default) on the bundled GAN loads it and the upscale runs
    rng = np.random.default_rng(5)
    server.add_input_image(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8), "noise_32x24.png")
    g = Graph()
    img = g.add("LoadImage", image="noise_32x24.png")
    model = g.add("DreamForgeLoadUpscaler", model_name=BUNDLED, impl=load_default, dtype="auto")
    s = save(g, out(esrgan(g, out(img), out(model))), unique("default_impl"))
    entry = server.wait(server.queue(g.nodes), timeout=120)
    assert ComfyServer.outcome(entry) == "success", ComfyServer.messages(entry)
    assert read_png(images_of(server, entry, s)[0])[0].shape == (96, 128, 3)


def test_chain_of_zoom_step_gives_sd_x4_the_tile_in_input_px(comfy, sdx4):
    """The Chain-of-Zoom nodes' `tile` reaches an SD x4 upscaler too (it ran untiled whatever the input said)."""
    g = Graph()
    img = g.add("LoadImage", image="coffee_64.png")
    step = g.add("DreamForgeCoZStep", state=out(img), upscaler=out(loader(g, model=sdx4["single"])), step=1,
                 mode="recursive", process_size=64, prompt="coffee", color_fix="none", seed=4, tile=16)
    r = g.add("PreviewAny", source=out(step, 2))
    entry = comfy.run(g.nodes, timeout=300)
    backend = json.loads(text_of(entry, r))["upscale"]["passes"][0]["backend"]
    assert backend["options"]["tile"] == 16 and backend["options"]["overlap"] == 32  # latent = input px for SD x4
