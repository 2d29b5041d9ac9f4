"""A real ComfyUI for the integration tests: one server for the whole session, started lazily by the first
test that asks for `comfy`, its receipts checked against docs/receipt.schema.json."""
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
TEST_NODES = Path(__file__).resolve().parent / "comfy_test_nodes"
BUNDLED_MODEL = "realesr-animevideov3.pth"  # ships in assets/bundled (not linked into models/)
X4PLUS_MODEL = "RealESRGAN_x4plus.pth"  # RRDB x4 from the shared weights
NOT_A_MODEL = "not_a_model.pth"  # garbage bytes
FAKE_SD_X4 = "x4-upscaler-ema.safetensors"  # header-true stand-in for the SD x4 upscaler checkpoint


def shared_weights_dir() -> Path:
    return Path(os.environ.get("DF_SHARED_WEIGHTS", REPO_ROOT.parent / "shared" / "weights"))


def _write_fake_sd_x4(path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    save_file({
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(256, 7, 3, 3, dtype=torch.float16),
        "model.diffusion_model.input_blocks.0.0.bias": torch.zeros(256, dtype=torch.float16),
        "first_stage_model.decoder.conv_in.weight": torch.zeros(8, 4, 3, 3, dtype=torch.float16),
    }, str(path))


def _input_images() -> dict:
    """Real photos (scikit-image's bundled samples), cropped small to keep the CPU suite fast."""
    from skimage import data

    astronaut = data.astronaut()
    return {
        "astronaut_128.png": astronaut[24:152, 176:304],  # the face, 128x128
        "astronaut_192.png": astronaut[0:192, 150:342],  # tile 64 + 2x32 context < 192: really tiled
        "chelsea_97x75.png": data.chelsea()[100:175, 150:247],  # odd sizes: 2.5x rounds
        "coffee_64.png": data.coffee()[150:214, 250:314],
        "astronaut_512.png": astronaut,  # for the long (interrupted) run
    }


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    """A real ComfyUI 0.3.75 (CPU) with the pack as custom_nodes/dreamforge-upscale-test (a symlink),
    the test-only nodes, RealESRGAN_x4plus (when the shared weights exist) and real photos in input/."""
    from comfy_headless import ComfyServer, comfyui_dir

    try:
        comfyui_dir()
    except FileNotFoundError as exc:
        pytest.skip(f"real ComfyUI not installed: {exc}")
    from PIL import Image

    base = tmp_path_factory.mktemp("comfyui-base")
    x4plus = shared_weights_dir() / X4PLUS_MODEL
    server = ComfyServer(base, models=[x4plus] if x4plus.is_file() else [],
                         extra_nodes={"dreamforge_test_nodes": TEST_NODES})
    (server.upscale_models_dir / NOT_A_MODEL).write_bytes(os.urandom(4096))
    _write_fake_sd_x4(server.upscale_models_dir / FAKE_SD_X4)
    for name, pixels in _input_images().items():
        Image.fromarray(pixels).save(server.input_dir / name)
    server.start(timeout=180)
    server.wait = _checking_receipts(server.wait)
    yield server
    server.stop()
    print(f"\nComfyUI log: {server.log_path}")
    _check_saved_receipts(server.output_dir)


def _checking_receipts(wait):
    """server.wait that also checks every receipt a finished prompt shows (text outputs: PreviewAny,
    DreamForgeTestSaveText) against the schema, so a test fails on the run that made a bad receipt."""
    from receipt_schema import is_receipt_json, problems

    def checked(*args, **kwargs):
        entry = wait(*args, **kwargs)
        for node, output in (entry.get("outputs") or {}).items():
            for text in output.get("text", []) if isinstance(output, dict) else []:
                receipt = is_receipt_json(text) if isinstance(text, str) else None
                bad = problems(receipt) if receipt else []
                assert not bad, f"node {node}'s receipt breaks docs/receipt.schema.json: {bad[:4]}"
        return entry

    return checked


def _check_saved_receipts(folder: Path) -> None:
    """The receipts the server's nodes made (saved as text by DreamForgeTestSaveText) match the schema."""
    from receipt_schema import is_receipt_json, problems

    bad = []
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix in (".json", ".txt") and (receipt := is_receipt_json(path.read_text())):
            bad += [f"{path.name}: {p}" for p in problems(receipt)[:3]]
    assert not bad, f"server receipts that break docs/receipt.schema.json: {bad[:6]}"


@pytest.fixture(scope="session")
def x4plus_name(comfy):
    """The RRDB model's name in models/upscale_models; skips when the shared weights are absent."""
    if not (comfy.upscale_models_dir / X4PLUS_MODEL).exists():
        pytest.skip(f"{X4PLUS_MODEL} not found in {shared_weights_dir()} (set DF_SHARED_WEIGHTS)")
    return X4PLUS_MODEL
