"""The command line and the library with Chain-of-Zoom's own model and DAPE tag prompts.

`dreamforge-upscale zoom photo.png --coz-model ... --tagger ... --sampling mean` and the library calls
(load_upscaler with both LoRA files, load_tagger, chain_of_zoom) run on the tiny random SD3 + LoRA files
(tests/tiny_sd3.py) and the tiny RAM + DAPE (tests/tiny_ram.py), installed in a real ComfyUI server's models/
folder; the Chain-of-Zoom Loop node, queued through that server with the same files and settings, returns
the same states and the same receipt (timings aside). Every receipt is validated against the schema.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from example_workflows import COZ_LORA_FOLDER, COZ_SD3_FOLDER, install_tiny_coz_sd3
from receipt_schema import problems
from test_comfyui_integration import Graph, out, unique
from test_comfyui_zoom import saved, text_of
from tiny_ram import save_tiny_dape, save_tiny_ram
from dreamforge_upscale.api import ModelPlaces, chain_of_zoom, load_tagger, load_upscaler
from dreamforge_upscale.cli import main
from dreamforge_upscale.upscalers import UpscalerError

RAM, DAPE = "ram_swin_large_14m.pth", "DAPE.pth"
BASE = f"diffusers/{COZ_SD3_FOLDER}"
PHOTO = "coffee_64.png"
STEPS, SIZE, PROMPT, SEED = 2, 64, "a cup of coffee", 3


@pytest.fixture(scope="module")
def models(comfy):
    """The server's models/ folder with the tiny Chain-of-Zoom model and the tiny RAM + DAPE (the same files
    tests/test_comfyui_dape.py writes, when it runs first)."""
    models = comfy.base / "models"
    install_tiny_coz_sd3(models)
    ram = models / "RAM" / RAM
    if not ram.is_file():
        save_tiny_ram(ram, image_weight=0.0, fc_bias=-20.0)  # a handful of image-independent tags
    if not (models / "RAM" / DAPE).is_file():
        save_tiny_dape(models / "RAM" / DAPE, ram)
    return models


def timeless(value):
    """A receipt without its timings (the only fields two runs of the same settings may differ in)."""
    if isinstance(value, dict):
        return {k: timeless(v) for k, v in value.items() if k != "seconds"}
    if isinstance(value, list):
        return [timeless(v) for v in value]
    return value


def cli_zoom(models: Path, photo: Path, folder: Path, *extra: str) -> tuple[list[np.ndarray], dict]:
    rc = main(["zoom", str(photo), "--coz-model", BASE, "--tagger", RAM, "--steps", str(STEPS),
               "--process-size", str(SIZE), "--prompt", PROMPT, "--seed", str(SEED), "--models-root", str(models),
               "--device", "cpu", "--out", str(folder), *extra])
    assert rc == 0
    result = folder / f"{photo.stem}_zoom"
    states = [np.asarray(Image.open(result / f"x{n}.png").convert("RGB")) for n in range(STEPS + 1)]
    receipt = json.loads((result / "receipt.json").read_text())
    assert not problems(receipt), problems(receipt)[:3]
    return states, receipt


def node_zoom(comfy, **loop_inputs) -> tuple[list[np.ndarray], dict]:
    g = Graph()
    img = g.add("LoadImage", image=PHOTO)
    model = g.add("DreamForgeLoadCoZModel", base_model=BASE, transformer_lora=f"{COZ_LORA_FOLDER}/model_20001.pkl",
                  vae_lora=f"{COZ_LORA_FOLDER}/vae_encoder_20001.pt", clip_l="(from checkpoint)",
                  clip_g="(from checkpoint)", t5xxl="(from checkpoint)", dtype="auto")
    tagger = g.add("DreamForgeLoadTagger", ram_model=RAM, dape=DAPE, max_tags=0, drop_tags="", keep_tags="",
                   threshold_offset=0.0, dtype="auto")
    loop = g.add("DreamForgeCoZLoop", image=out(img), upscaler=out(model), steps=STEPS, mode="recursive_multiscale",
                 process_size=SIZE, prompt=PROMPT, color_fix="wavelet", seed=SEED, tile=0, prompt_model=out(tagger),
                 **loop_inputs)
    s = g.add("SaveImage", images=out(loop), filename_prefix=unique("coz_cli"))
    r = g.add("PreviewAny", source=out(loop, 2))
    entry = comfy.run(g.nodes, timeout=600)
    return saved(comfy, entry, s), json.loads(text_of(entry, r))


def test_cli_zoom_with_the_coz_model_and_dape_equals_the_loop_node(comfy, models, tmp_path):
    photo = comfy.input_dir / PHOTO
    states, receipt = cli_zoom(models, photo, tmp_path / "mean", "--sampling", "mean")
    assert receipt["kind"] == "zoom_loop" and receipt["sampling"] == "mean"
    assert receipt["prompt_provider"] == f"dape:{RAM}+{DAPE}"
    assert receipt["upscaler"]["model"]["architecture"].startswith("Chain-of-Zoom SR")
    generated = [s["prompt"]["generated"] for s in receipt["step_receipts"]]
    assert all(generated) and all(s["prompt"]["text"] == f"{g}, {PROMPT}," for s, g in
                                  zip(receipt["step_receipts"], generated))
    for step in receipt["step_receipts"]:
        backend = step["upscale"]["passes"][0]["backend"]
        assert step["sampling"] == "mean" and backend["sampling"] == "mean"
        assert backend["sr_input"].startswith("8-bit") and backend["sr_input_size"] == [SIZE, SIZE]
        assert any("posterior mean" in n for n in step["upscale"]["notes"])

    node_states, node_receipt = node_zoom(comfy, sampling="mean")
    assert len(node_states) == STEPS + 1
    for n, (a, b) in enumerate(zip(states, node_states)):
        assert np.array_equal(a, b), f"x{n}"
    assert timeless(receipt) == timeless(node_receipt)

    # the library: the same model, tagger and loop, the same states and receipt
    places = ModelPlaces(models_root=models)
    upscaler = load_upscaler(BASE, device="cpu", places=places)
    tagger = load_tagger(RAM, DAPE, device="cpu", places=places)
    result = chain_of_zoom(upscaler, photo, STEPS, process_size=SIZE, prompt=PROMPT, prompt_model=tagger,
                           seed=SEED, sampling="mean", device="cpu")
    for n, (a, b) in enumerate(zip(states, result.states)):
        assert np.array_equal(a, np.asarray(b)), f"x{n}"
    library = json.loads(result.receipt.to_json())
    assert not problems(library), problems(library)[:3]
    assert timeless(library) == timeless(receipt)


def test_default_sampling_is_the_papers_sample_on_every_route(comfy, models, tmp_path):
    """No --sampling = sample (seeded); a saved workflow without the sampling input runs as before: sample."""
    photo = comfy.input_dir / PHOTO
    states, receipt = cli_zoom(models, photo, tmp_path / "sample")
    assert receipt["sampling"] == "sample"
    assert all(s["upscale"]["passes"][0]["backend"]["sampling"] == "sample" for s in receipt["step_receipts"])
    node_states, node_receipt = node_zoom(comfy)  # no sampling input at all: an old workflow
    assert all(np.array_equal(a, b) for a, b in zip(states, node_states))
    assert timeless(receipt) == timeless(node_receipt)
    mean_states, _ = cli_zoom(models, photo, tmp_path / "mean", "--sampling", "mean")
    assert not np.array_equal(states[1], mean_states[1])  # the posterior noise is really drawn


def test_cli_and_library_refuse_what_does_not_fit(models, tmp_path, capsys):
    photo = tmp_path / "p.png"
    Image.new("RGB", (64, 64), (120, 90, 60)).save(photo)
    root = ["--models-root", str(models), "--device", "cpu", "--out", str(tmp_path / "o")]
    assert main(["zoom", str(photo), "--transformer-lora", "x.pkl", *root]) == 1
    assert "add --coz-model BASE" in capsys.readouterr().err
    assert main(["zoom", str(photo), "--coz-model", BASE, "--model", "x.pth", *root]) == 1
    assert "not both" in capsys.readouterr().err
    assert main(["zoom", str(photo), "--tagger", RAM, "--prompt-model", "LLM", *root]) == 1
    assert "not both" in capsys.readouterr().err
    assert main(["zoom", str(photo), "--coz-model", BASE, "--vae-lora", "missing.pt", *root]) == 1
    assert "Chain-of-Zoom vae lora 'missing.pt' not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["zoom", str(photo), "--sampling", "median", *root])
    places = ModelPlaces(models_root=models)
    with pytest.raises(UpscalerError, match="not SD3 medium"):
        load_upscaler(None, transformer_lora="x.pkl", device="cpu", places=places)
    with pytest.raises(UpscalerError, match="sampling must be one of sample, mean"):
        chain_of_zoom(None, photo, 1, mode="bicubic", process_size=64, sampling="median")
