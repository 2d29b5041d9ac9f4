"""The SD x4 upscaler inside a real ComfyUI (CPU) over HTTP, with tiny random weights in the two layouts
users have: a diffusers folder in models/diffusers and the single file in models/checkpoints."""
from __future__ import annotations

import hashlib
import time

import pytest

import tiny_sdx4
from comfy_headless import ComfyServer
from test_comfyui_integration import BUNDLED, Graph, images_of, loader, out, read_png, receipt_of, save, save_text, unique

FOLDER = "tiny-sdx4-upscaler"
SINGLE = "tiny-x4-upscaler-ema.safetensors"
IMAGE = "coffee_64.png"


@pytest.fixture(scope="module")
def sdx4(comfy):
    """Both layouts installed into the running server's model folders (ComfyUI re-lists on change)."""
    models = comfy.base / "models"
    (models / "diffusers").mkdir(parents=True, exist_ok=True)
    (models / "checkpoints").mkdir(parents=True, exist_ok=True)
    if not (models / "diffusers" / FOLDER).exists():
        tiny_sdx4.write_diffusers_folder(models / "diffusers" / FOLDER, seed=0)
        tiny_sdx4.write_single_file(models / "checkpoints" / SINGLE, seed=0)
    return {"folder": f"diffusers/{FOLDER}", "single": f"checkpoints/{SINGLE}"}


def crop(g: Graph, size: int = 16) -> list:
    img = g.add("LoadImage", image=IMAGE)
    return out(g.add("ImageCrop", image=out(img), width=size, height=size, x=20, y=20))


def sdx4_node(g: Graph, image, upscaler, seed=1, steps=2, prompt="a cup of coffee", tile=0, overlap=32):
    return g.add("DreamForgeSDX4Upscale", image=image, upscaler=upscaler, prompt=prompt, negative_prompt="blurry",
                 seed=seed, steps=steps, guidance=7.5, noise_level=20, tile=tile, overlap=overlap, vae_tile=0)


def test_both_layouts_are_listed_and_load(comfy, sdx4):
    names = comfy.object_info("DreamForgeLoadUpscaler")["input"]["required"]["model_name"][0]
    assert sdx4["folder"] in names and sdx4["single"] in names
    info = comfy.object_info("DreamForgeSDX4Upscale")["input"]["required"]
    assert info["steps"][1]["default"] == 50 and info["guidance"][1]["default"] == 7.5
    assert info["noise_level"][1]["default"] == 20 and info["prompt"][1]["default"] == "high quality, detailed"


def test_sdx4_upscale_runs_from_both_layouts_same_seed_same_image(comfy, sdx4):
    g = Graph()
    image = crop(g)
    saves, texts = [], []
    for model in (sdx4["folder"], sdx4["single"], sdx4["single"]):
        up = sdx4_node(g, image, out(loader(g, model=model)))
        saves.append(save(g, out(up), unique("sdx4")))
        texts.append(save_text(g, out(up, 1), unique("sdx4_receipt")))
    other = sdx4_node(g, image, out(loader(g, model=sdx4["single"], impl="diffusion")), seed=2)
    s_other = save(g, out(other), unique("sdx4_other"))
    entry = comfy.run(g.nodes, timeout=300)
    pixels = [read_png(images_of(comfy, entry, s)[0])[0] for s in saves + [s_other]]
    assert all(p.shape == (64, 64, 3) for p in pixels)
    digests = [hashlib.sha256(p.tobytes()).hexdigest() for p in pixels]
    assert digests[0] == digests[1] == digests[2]  # same weights, same seed: the same image, bit for bit
    assert digests[3] != digests[0] and abs(pixels[3] - pixels[0]).mean() > 1
    receipt = receipt_of(comfy, entry, texts[1])
    assert receipt["impl"] == "diffusion" and receipt["seed"] == 1 and receipt["native_scale"] == 4
    backend = receipt["passes"][0]["backend"]
    assert receipt["model"]["file"] == SINGLE and backend["options"]["steps"] == 2
    assert receipt["prompt"]["text"] == "a cup of coffee" and receipt["prompt"]["used"]
    assert [p["text"] for p in receipt["passes"][0]["prompts"]] == ["a cup of coffee"]
    assert receipt_of(comfy, entry, texts[0])["model"]["file"] == FOLDER


# impl x scale x strict with the SD x4 model connected. x4 GANs only: 2x needs resampling (strict refuses).
POLICY = [
    # impl, scale, strict -> ("ok", ran, resampled-from) | ("error", phrase) | ("rejected", phrase)
    ("auto", 2.0, False, ("ok", "gan", 4)),
    ("auto", 2.0, True, ("error", "strict_scale: impl gan")),
    ("auto", 4.0, False, ("ok", "diffusion", None)),
    ("auto", 4.0, True, ("ok", "diffusion", None)),
    ("diffusion", 2.0, False, ("ok", "diffusion", 4)),
    ("diffusion", 2.0, True, ("rejected", "strict_scale: impl diffusion")),
    ("diffusion", 4.0, False, ("ok", "diffusion", None)),
    ("diffusion", 4.0, True, ("ok", "diffusion", None)),
    ("gan", 2.0, False, ("ok", "gan", 4)),
    ("gan", 2.0, True, ("error", "strict_scale: impl gan")),
    ("gan", 4.0, False, ("ok", "gan", None)),
    ("gan", 4.0, True, ("ok", "gan", None)),
]


@pytest.mark.parametrize("impl,scale,strict,expect", POLICY, ids=[f"{i}-{s:g}x-{'strict' if t else 'free'}" for i, s, t, _ in POLICY])
def test_tiled_upscale_impl_policy(comfy, sdx4, impl, scale, strict, expect):
    g = Graph()
    image = crop(g)
    tiled = g.add("DreamForgeTiledUpscale", image=image, upscaler=out(loader(g, model=sdx4["single"])), impl=impl,
                  scale=scale, strict_scale=strict, tile=0, overlap=16, resample="lanczos", prompt="coffee",
                  negative_prompt="", seed=3, steps=2, guidance=7.5, noise_level=20)
    s = save(g, out(tiled), unique("policy"))
    t = save_text(g, out(tiled, 1), unique("policy_receipt"))
    if expect[0] == "rejected":  # refused when queued, before any work
        status, body = comfy.post_prompt(g.nodes)
        assert status == 400, body
        assert expect[1] in str(body["node_errors"][tiled]), body
        return
    entry = comfy.wait(comfy.queue(g.nodes), timeout=300)
    if expect[0] == "error":
        assert ComfyServer.outcome(entry) == "error"
        err = ComfyServer.execution_error(entry)
        assert err["node_id"] == tiled and expect[1] in err["exception_message"], err
        return
    assert ComfyServer.outcome(entry) == "success", ComfyServer.messages(entry)
    arr, _ = read_png(images_of(comfy, entry, s)[0])
    assert arr.shape == (round(16 * scale), round(16 * scale), 3)
    receipt = receipt_of(comfy, entry, t)
    assert receipt["impl"] == expect[1] and receipt["policy"]["ran"] == expect[1], receipt
    assert (receipt["resampled"] or {}).get("from_scale") == expect[2]
    if expect[1] == "gan":
        assert receipt["model"]["file"] != SINGLE  # a GAN from models/upscale_models ran instead


def test_tiled_upscale_tile_and_overlap_reach_the_unet(comfy, sdx4):
    """The user's lever against out-of-memory: Tiled Upscale's tile/overlap are SD x4's latent tiles."""
    g = Graph()
    tiled = g.add("DreamForgeTiledUpscale", image=crop(g), upscaler=out(loader(g, model=sdx4["single"])),
                  impl="diffusion", scale=4.0, strict_scale=True, tile=8, overlap=4, resample="lanczos",
                  prompt="coffee", negative_prompt="", seed=3, steps=1, guidance=1.0, noise_level=20)
    save(g, out(tiled), unique("tiled_unet"))
    t = save_text(g, out(tiled, 1), unique("tiled_unet_receipt"))
    entry = comfy.run(g.nodes, timeout=300)
    receipt = receipt_of(comfy, entry, t)
    backend = receipt["passes"][0]["backend"]
    tiles = backend["unet_tiles"]
    assert tiles["count"] > 1 and max(tiles["tile"]) <= 8 and tiles["overlap"] >= 4, tiles
    assert backend["options"]["tile"] == 8 and backend["options"]["overlap"] == 4


@pytest.mark.parametrize("strict", [False, True])
def test_out_of_memory_falls_back_loudly_or_fails_under_strict_scale(comfy, sdx4, strict):
    """SD x4 out of memory at every size: a GAN makes the image, and the receipt (fallbacks, degraded,
    policy.ran) and the node's UI message say so; strict_scale refuses instead."""
    g = Graph()
    faulty = g.add("DreamForgeTestOutOfMemory", upscaler=out(loader(g, model=sdx4["single"])))
    tiled = g.add("DreamForgeTiledUpscale", image=crop(g), upscaler=out(faulty), impl="diffusion", scale=4.0,
                  strict_scale=strict, tile=0, overlap=16, resample="lanczos", prompt="coffee", negative_prompt="",
                  seed=3, steps=1, guidance=1.0, noise_level=20)
    s = save(g, out(tiled), unique("oom_fallback"))
    t = save_text(g, out(tiled, 1), unique("oom_fallback_receipt"))
    entry = comfy.wait(comfy.queue(g.nodes), timeout=300)
    if strict:
        err = ComfyServer.execution_error(entry)
        assert err["node_id"] == tiled and "strict_scale forbids falling back" in err["exception_message"], err
        assert "4.00 GiB" in err["exception_message"]
        return
    assert ComfyServer.outcome(entry) == "success", ComfyServer.messages(entry)
    arr, _ = read_png(images_of(comfy, entry, s)[0])
    assert arr.shape == (64, 64, 3)
    receipt = receipt_of(comfy, entry, t)
    assert receipt["impl"] == "gan" and receipt["policy"]["ran"] == "gan"
    assert [f["impl"] for f in receipt["fallbacks"]] == ["diffusion", "gan"]
    assert receipt["degraded"]["instead_of"] == "diffusion" and "4.00 GiB" in receipt["degraded"]["reason"]
    assert entry["outputs"][tiled]["dreamforge_degraded"][0]["ran"] == "gan"  # what the UI / API client sees
    assert "ran out of memory; the result was made by gan instead" in comfy.log_text()


def test_gan_nodes_refuse_the_diffusion_model_with_directions(comfy, sdx4):
    g = Graph()
    img = g.add("LoadImage", image=IMAGE)
    core = g.add("UpscaleModelLoader", model_name="x4-upscaler-ema.safetensors")
    save(g, out(g.add("ImageUpscaleWithModel", upscale_model=out(core), image=out(img))), unique("core_sdx4"))
    entry = comfy.wait(comfy.queue(g.nodes), timeout=120)
    err = ComfyServer.execution_error(entry)
    assert err["node_id"] == core and "Stable Diffusion x4" in err["exception_message"], err
    assert "impl 'diffusion'" in err["exception_message"]

    g = Graph()
    image = crop(g)
    esr = g.add("DreamForgeESRGANUpscale", image=image, upscale_model=out(loader(g, model=sdx4["single"])), scale=0.0,
                tile=0, overlap=16, resample="lanczos")
    save(g, out(esr), unique("esrgan_sdx4"))
    err = ComfyServer.execution_error(comfy.wait(comfy.queue(g.nodes), timeout=120))
    assert err["node_id"] == esr and "SDX4 Upscale" in err["exception_message"], err

    g = Graph()
    image = crop(g)
    sd = sdx4_node(g, image, out(loader(g, model=BUNDLED)))
    save(g, out(sd), unique("sdx4_gan"))
    err = ComfyServer.execution_error(comfy.wait(comfy.queue(g.nodes), timeout=120))
    assert err["node_id"] == sd and "needs the Stable Diffusion x4 upscaler" in err["exception_message"], err


def test_interrupt_mid_denoise_stops_cleanly(comfy, sdx4):
    g = Graph()
    image = crop(g, 64)
    up = sdx4_node(g, image, out(loader(g, model=sdx4["folder"])), steps=400, tile=32, overlap=8)
    save(g, out(up), unique("sdx4_interrupted"))
    ws = comfy.listen()
    try:
        prompt_id = comfy.queue(g.nodes)
        first = ws.wait_for(lambda m: m.get("type") == "progress" and m["data"].get("node") == up
                            and m["data"].get("prompt_id") == prompt_id and m["data"]["value"] >= 6, timeout=180)
        total = first["data"]["max"]
        assert total >= 400 * 4, first  # steps x latent tiles
        asked = time.monotonic()
        assert comfy.post_interrupt() == 200
        entry = comfy.wait(prompt_id, timeout=60)
        took = time.monotonic() - asked
    finally:
        ws.close()
    assert ComfyServer.outcome(entry) == "interrupted", ComfyServer.messages(entry)
    assert dict(ComfyServer.messages(entry))["execution_interrupted"]["node_id"] == up
    assert took < 30 and not entry.get("outputs")
    # the server keeps serving: the same model runs to completion right after
    g = Graph()
    done = sdx4_node(g, crop(g), out(loader(g, model=sdx4["folder"])))
    s = save(g, out(done), unique("sdx4_after"))
    arr, _ = read_png(images_of(comfy, comfy.run(g.nodes, timeout=300), s)[0])
    assert arr.shape == (64, 64, 3)


def test_attention_slicing_and_cpu_offload_give_the_same_image(comfy, sdx4):
    g = Graph()
    image = crop(g)
    plain = sdx4_node(g, image, out(loader(g, model=sdx4["folder"])))
    lean_loader = g.add("DreamForgeLoadUpscaler", model_name=sdx4["single"], impl="diffusion", dtype="auto",
                        attention_slicing=True, cpu_offload=True)
    lean = sdx4_node(g, image, out(lean_loader))
    s_plain, s_lean = save(g, out(plain), unique("sdx4_plain")), save(g, out(lean), unique("sdx4_lean"))
    entry = comfy.run(g.nodes, timeout=300)
    a = read_png(images_of(comfy, entry, s_plain)[0])[0]
    b = read_png(images_of(comfy, entry, s_lean)[0])[0]
    assert a.shape == b.shape == (64, 64, 3) and a.std() > 5
    assert abs(a - b).max() <= 1  # sliced attention and one-network-at-a-time change no pixel by more than a level
