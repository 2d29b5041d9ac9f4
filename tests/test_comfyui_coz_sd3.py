"""Load Chain-of-Zoom Model inside a real ComfyUI (CPU) over HTTP, with the tiny random SD3 + LoRA files
installed where users put them (models/diffusers, models/checkpoints + models/text_encoders,
models/loras/chain-of-zoom), and the example workflow example_workflows/api/coz_own_model.json queued
with a smaller loop (the browser test runs the UI file as it is)."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

import tiny_sd3
from comfy_headless import ComfyServer
from dreamforge_upscale.upscalers.coz_sd3 import CoZSD3Upscaler, TokenizerDirs
from dreamforge_upscale.upscalers.coz_sd3.backend import NO_T5_NOTE
from dreamforge_upscale.zoom import ZoomSettings, zoom_loop
from example_workflows import BY_NAME, COZ_LORA_FOLDER, COZ_SD3_FOLDER, TAGGER_FILES, install_tiny_coz_sd3, install_tiny_tagger
from test_comfyui_integration import Graph, out, unique
from test_comfyui_zoom import as_tensor, input_pil, saved, text_of, workflow

FOLDER = "tiny-sd3-medium"
LORA = COZ_LORA_FOLDER


@pytest.fixture(scope="module")
def coz(comfy):
    models = comfy.base / "models"
    install_tiny_coz_sd3(models)  # the example workflow's names: SD3's diffusers folder, models/loras/chain-of-zoom
    install_tiny_tagger(models / "RAM")  # and its DAPE tagger's files in models/RAM
    if not (models / "diffusers" / FOLDER).exists():
        tiny_sd3.write_diffusers_folder(models / "diffusers" / FOLDER)
        (models / "checkpoints").mkdir(parents=True, exist_ok=True)
        single = tiny_sd3.write_single_files(models / "text_encoders")  # clip_l, clip_g, t5xxl_fp16 stay there
        single["checkpoint"].rename(models / "checkpoints" / "sd3_medium.safetensors")
    return {"folder": f"diffusers/{FOLDER}", "single": "checkpoints/sd3_medium.safetensors", "models": models}


def load_node(g: Graph, base: str, t5: str = "t5xxl_fp16.safetensors", clip=("clip_l.safetensors", "clip_g.safetensors")):
    return g.add("DreamForgeLoadCoZModel", base_model=base, transformer_lora=f"{LORA}/model_20001.pkl",
                 vae_lora=f"{LORA}/vae_encoder_20001.pt", clip_l=clip[0], clip_g=clip[1], t5xxl=t5, dtype="auto")


def loop_node(g: Graph, image, upscaler, steps=2, size=64, seed=3):
    return g.add("DreamForgeCoZLoop", image=image, upscaler=upscaler, steps=steps, mode="recursive_multiscale",
                 process_size=size, prompt="a cup of coffee", color_fix="wavelet", seed=seed, tile=0)


def test_loader_lists_the_models_where_users_put_them(comfy, coz):
    info = comfy.object_info("DreamForgeLoadCoZModel")
    assert info["display_name"] == "Load Chain-of-Zoom Model (DreamForge)" and info["output"] == ["UPSCALER"]
    req = info["input"]["required"]
    assert coz["folder"] in req["base_model"][0] and coz["single"] in req["base_model"][0]
    assert req["transformer_lora"][0][0] == f"{LORA}/model_20001.pkl"
    assert req["vae_lora"][0][0] == f"{LORA}/vae_encoder_20001.pt"
    assert "t5xxl_fp16.safetensors" in req["t5xxl"][0] and "none (no T5)" in req["t5xxl"][0]


def test_loop_two_steps_matches_the_backend(comfy, coz):
    g = Graph()
    img = g.add("LoadImage", image="coffee_64.png")
    loop = loop_node(g, out(img), out(load_node(g, coz["folder"], clip=("(from checkpoint)", "(from checkpoint)"),
                                                 t5="(from checkpoint)")))
    s = g.add("SaveImage", images=out(loop), filename_prefix=unique("coz_sd3_loop"))
    r = g.add("PreviewAny", source=out(loop, 2))
    entry = comfy.run(g.nodes, timeout=300)
    states = saved(comfy, entry, s)
    assert len(states) == 3 and all(x.shape == (64, 64, 3) for x in states)
    receipt = json.loads(text_of(entry, r))
    assert receipt["upscaler"]["model"]["architecture"].startswith("Chain-of-Zoom SR")
    steps = receipt["step_receipts"]
    assert [s_["upscale"]["passes"][0]["backend"]["prompt_embedding"] for s_ in steps] == ["encoded", "reused"]
    (prompts,) = receipt["prompts"]  # each step prompted with the tagger's tags (the tiny tagger: the same few)
    assert len(prompts) == 2 and prompts[0] and prompts[0] == prompts[1], prompts
    assert steps[0]["upscale"]["passes"][0]["backend"]["sr_input_size"] == [64, 64]  # the 16 px crop, bicubic 4x
    # the same loop outside ComfyUI with the same files: the same states
    models = coz["models"]
    ours = CoZSD3Upscaler.load(models / "diffusers" / FOLDER, models / "loras" / LORA / "model_20001.pkl",
                               models / "loras" / LORA / "vae_encoder_20001.pt", device=torch.device("cpu"),
                               tokenizer_dirs=TokenizerDirs(tiny_sd3.clip_tokenizer_dir(), tiny_sd3.t5_tokenizer_dir()))
    result = zoom_loop(ours, as_tensor(input_pil(comfy, "coffee_64.png")), 2,
                       ZoomSettings(mode="recursive_multiscale", process_size=64, user_prompt="a cup of coffee", seed=3))
    for a, b in zip(states, result.states[0]):
        assert np.abs(a.astype(np.int16) - np.asarray(b, np.int16)).max() <= 1


def test_full_image_2_5x_and_tiled_upscale_from_the_single_files_without_t5(comfy, coz):
    g = Graph()
    img = g.add("LoadImage", image="chelsea_97x75.png")
    model = out(load_node(g, coz["single"], t5="none (no T5)"))
    full = g.add("DreamForgeCoZUpscale", image=out(img), upscaler=model, scale=2.5, prompt="a cat", color_fix="wavelet",
                 seed=1, tile=0, overlap=16, resample="lanczos", max_side=8192, tile_prompts=True)
    crop = g.add("ImageCrop", image=out(img), width=24, height=20, x=30, y=20)
    tiled = g.add("DreamForgeTiledUpscale", image=out(crop), upscaler=model, impl="diffusion", scale=4.0,
                  strict_scale=True, tile=0, overlap=16, resample="lanczos", prompt="a cat", negative_prompt="",
                  seed=2, steps=2, guidance=7.5, noise_level=20)
    s_full = g.add("SaveImage", images=out(full), filename_prefix=unique("coz_sd3_2_5x"))
    s_tiled = g.add("SaveImage", images=out(tiled), filename_prefix=unique("coz_sd3_tiled"))
    r_full, r_tiled = g.add("PreviewAny", source=out(full, 1)), g.add("PreviewAny", source=out(tiled, 1))
    entry = comfy.run(g.nodes, timeout=300)
    (big,), (small,) = saved(comfy, entry, s_full), saved(comfy, entry, s_tiled)
    assert big.shape == (188, 242, 3) and small.shape == (80, 96, 3)
    (one_pass,) = json.loads(text_of(entry, r_full))["passes"]
    plan = one_pass["upscale"]["passes"][0]["backend"]
    assert NO_T5_NOTE in one_pass["upscale"]["notes"] and plan["networks"]["t5"] is None
    assert plan["transformer_tiles"]["count"] > 1  # 388x300 -> latent 50x38: past the tiny position grid (32)
    receipt = json.loads(text_of(entry, r_tiled))
    assert receipt["impl"] == "diffusion" and receipt["policy"]["ran"] == "diffusion" and receipt["seed"] == 2
    assert receipt["model"]["file"] == "sd3_medium.safetensors" and receipt["output_size"] == [96, 80]


def test_interrupt_mid_loop_and_the_server_keeps_serving(comfy, coz):
    g = Graph()
    img = g.add("LoadImage", image="astronaut_512.png")
    loop = loop_node(g, out(img), out(load_node(g, coz["folder"])), steps=8, size=256, seed=9)
    g.add("SaveImage", images=out(loop), filename_prefix=unique("coz_sd3_interrupted"))
    ws = comfy.listen()
    try:
        prompt_id = comfy.queue(g.nodes)
        first = ws.wait_for(lambda m: m.get("type") == "progress" and m["data"].get("prompt_id") == prompt_id
                            and m["data"].get("node") == loop and m["data"]["value"] >= 1, timeout=300)
        assert first["data"]["max"] == 8
        asked = time.monotonic()
        assert comfy.post_interrupt() == 200
        entry = comfy.wait(prompt_id, timeout=120)
        took = time.monotonic() - asked
    finally:
        ws.close()
    assert ComfyServer.outcome(entry) == "interrupted", ComfyServer.messages(entry)
    assert dict(ComfyServer.messages(entry))["execution_interrupted"]["node_id"] == loop
    assert took < 60 and not entry.get("outputs")
    g = Graph()
    img = g.add("LoadImage", image="coffee_64.png")
    s = g.add("SaveImage", images=out(loop_node(g, out(img), out(load_node(g, coz["folder"])), steps=1, seed=4)),
              filename_prefix=unique("coz_sd3_after"))
    assert len(saved(comfy, comfy.run(g.nodes, timeout=300), s)) == 2


def test_example_workflow_loads_the_files_its_note_names_and_runs(comfy, coz):
    """coz_own_model.json as it is but for a smaller loop (2 steps at 128 px on a 64 px photo)."""
    g = workflow("coz_own_model.json")
    load = g["2"]["inputs"]
    note = BY_NAME["coz_own_model"].note
    # the note says where each file the loader names goes
    assert load["base_model"] == f"diffusers/{COZ_SD3_FOLDER}" and f"models/diffusers/{COZ_SD3_FOLDER}" in note
    for key in ("transformer_lora", "vae_lora"):
        folder, name = load[key].split("/")
        assert f"models/loras/{folder}/" in note and name in note, (key, load[key])
    for name in ("sd3_medium.safetensors", "clip_l.safetensors", "clip_g.safetensors", "t5xxl_fp16.safetensors",
                 *TAGGER_FILES):
        assert name in note
    tagger = g[g["3"]["inputs"]["prompt_model"][0]]  # the paper's prompts: DAPE tags, from the files the note names
    assert tagger["class_type"] == "DreamForgeLoadTagger" and (tagger["inputs"]["ram_model"],
                                                               tagger["inputs"]["dape"]) == TAGGER_FILES
    g["1"]["inputs"]["image"] = "coffee_64.png"
    g["3"]["inputs"].update(steps=2, process_size=128)
    g["4"]["inputs"]["filename_prefix"] = unique("coz_own_model")
    entry = comfy.run(g, timeout=300)
    states = saved(comfy, entry, "4")
    assert len(states) == 3 and all(x.shape == (128, 128, 3) for x in states)
    receipt = json.loads(text_of(entry, "5"))
    model = receipt["upscaler"]["model"]
    assert model["architecture"].startswith("Chain-of-Zoom SR") and model["file"] == COZ_SD3_FOLDER, model
    steps = receipt["step_receipts"]
    parts = {f["part"]: f for f in steps[0]["upscale"]["passes"][0]["backend"]["model_files"]}  # each step quotes its files
    assert parts["diffusers folder"]["file"] == COZ_SD3_FOLDER
    for part, name in (("transformer LoRA", "model_20001.pkl"), ("VAE encoder LoRA", "vae_encoder_20001.pt")):
        assert parts[part]["file"] == name and len(parts[part]["sha256"]) == 64, parts[part]
    assert [s_["upscale"]["passes"][0]["backend"]["prompt_embedding"] for s_ in steps] == ["encoded", "reused"]
    (prompts,) = receipt["prompts"]  # each step prompted with the tagger's tags (the tiny tagger: the same few)
    assert len(prompts) == 2 and prompts[0] and prompts[0] == prompts[1], prompts
    assert all(s_["upscale"]["passes"][0]["backend"]["sr_input_size"] == [128, 128] for s_ in steps)
