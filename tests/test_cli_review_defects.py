"""Defects an independent review reproduced in the command line and the library.

1. --skip-existing knew the model by the name typed: new weights behind the same path kept old outputs.
3. api.as_image passed integer tensors / arrays through unscaled (white output).
5. A small PNG of 9000x9000 was decoded (gigabytes) before the size guard refused it.
6. Raw file names went to the terminal: a newline split lines, escape sequences drove the terminal.
"""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from cli_photos import receipt_of, sha256, write_photos
from dreamforge_upscale.api import as_image, load_upscaler, upscale_image
from dreamforge_upscale.cli import main
from dreamforge_upscale.cli import upscale_jobs
from dreamforge_upscale.cli.images import plan_jobs, unfinished_reason
from dreamforge_upscale.imaging.image_io import read_image
from dreamforge_upscale.cli import progress
from dreamforge_upscale.cli.progress import Outcome, Progress
from dreamforge_upscale.upscalers import UpscalerError
from dreamforge_upscale.assets.bundled_model import bundled_model_path


# ------------------------------------------------------------------------------------- 1. model identity
def _other_weights(target: Path) -> None:
    """The bundled network's architecture with other weights (spandrel still loads it): its last conv
    halved, so every output pixel changes."""
    state = torch.load(bundled_model_path(), map_location="cpu", weights_only=True)
    params = state["params"] if "params" in state else state
    last = sorted(k for k, v in params.items() if k.endswith("weight") and v.ndim == 4)[-1]
    params[last] = params[last] * 0.5
    torch.save(state, target)


def test_skip_existing_redoes_outputs_when_the_weights_behind_the_same_path_change(tmp_path, capsys):
    src = write_photos(tmp_path / "in", count=1)[0]
    model = tmp_path / "models" / "mine.pth"
    model.parent.mkdir()
    shutil.copy(bundled_model_path(), model)
    out = tmp_path / "out"
    args = ["upscale", str(src), "--scale", "2", "--model", str(model), "--out", str(out), "--device", "cpu",
            "--skip-existing"]
    assert main(args) == 0
    output = out / "astronaut_x2.png"
    first, first_sha = output.read_bytes(), sha256(model)
    capsys.readouterr()

    assert main(args) == 0  # same weights: skipped, nothing rewritten
    assert "done 0, skipped 1, failed 0 (of 1)" in capsys.readouterr().out
    assert output.read_bytes() == first

    _other_weights(model)  # same path, same name, another network
    assert main(args) == 0
    assert "done 1, skipped 0, failed 0 (of 1)" in capsys.readouterr().out
    assert output.read_bytes() != first

    assert main(args) == 0  # and the new output is kept by the next resume
    assert "done 0, skipped 1, failed 0 (of 1)" in capsys.readouterr().out
    receipt = receipt_of(output)
    assert sha256(model) != first_sha
    assert receipt["cli"]["settings"]["model_sha256"] == sha256(model)  # the weights, not the name typed
    assert receipt["model"]["sha256"] == sha256(model)[:12]  # the same hash the receipt's model part shows


def test_settings_name_every_option_that_changes_pixels_and_old_receipts_are_redone(tmp_path):
    cfg = upscale_jobs.UpscaleConfig(scale=2.0, device="cpu", models_root=str(tmp_path / "root"))
    settings = cfg.settings()
    assert settings["model_sha256"] == sha256(bundled_model_path())
    assert "model" not in settings  # the name typed identifies nothing
    for key in ("scale", "impl", "dtype", "device", "tile", "overlap", "resample", "prompt", "negative_prompt",
                "seed", "steps", "guidance", "noise_level", "models_root", "comfyui_models", "mirror",
                "clip_tokenizer"):
        assert key in settings, key
    assert settings["models_root"] == str((tmp_path / "root").resolve())
    for change in ({"steps": 20}, {"seed": 3}, {"dtype": "bf16"}, {"overlap": 8}, {"resample": "bicubic"},
                   {"models_root": str(tmp_path / "other")}):
        assert upscale_jobs.UpscaleConfig(**{**vars(cfg), **change}).settings() != settings, change

    # a receipt written before the weights' hash was recorded names the model by its name: redone
    src = write_photos(tmp_path / "in", count=1)[0]
    (job,), _ = plan_jobs([str(src)], tmp_path / "out", 2.0)
    job.output.parent.mkdir(parents=True)
    job.output.write_bytes(b"png")
    old = {k: v for k, v in settings.items() if k != "model_sha256"} | {"model": "realesr-animevideov3.pth"}
    job.receipt.write_text(json.dumps({"cli": {"settings": old, "output_sha256": hashlib.sha256(b"png").hexdigest(),
                                               "input_sha256": sha256(src)}}))
    assert unfinished_reason(job, settings) == "made by other model weights"


# ------------------------------------------------------------------------------------- 3. integer pixels
def test_as_image_scales_uint8_and_uint16_and_refuses_other_integers_by_name():
    grey = np.array([[0, 128, 255]], np.uint8)
    for given in (torch.from_numpy(grey), grey, torch.from_numpy(np.dstack([grey] * 3))):
        got = as_image(given)
        assert got.dtype == torch.float32 and got.ndim == 4
        assert got.max().item() == 1.0 and got.min().item() == 0.0
        assert abs(got[0, 0, 1, 0].item() - 128 / 255) < 1e-6
    wide = np.array([[0, 32768, 65535]], np.uint16)
    got = as_image(wide)
    assert got.max().item() == 1.0 and abs(got[0, 0, 1, 0].item() - 32768 / 65535) < 1e-6
    assert torch.equal(as_image(torch.from_numpy(wide.astype(np.int32)).to(torch.uint16)), got)
    floats = np.full((2, 2, 3), 0.25, np.float32)
    assert torch.equal(as_image(floats), torch.from_numpy(floats)[None])  # floats stay as given (0..1)

    for bad, kind in ((np.ones((2, 2, 3), np.int32), "numpy array of dtype int32"),
                      (np.ones((2, 2, 3), np.int16), "numpy array of dtype int16"),
                      (np.ones((2, 2, 3), bool), "numpy array of dtype bool"),
                      (torch.ones(2, 2, 3, dtype=torch.int64), "tensor of dtype int64"),
                      (torch.ones(2, 2, 3, dtype=torch.bool), "tensor of dtype bool"),
                      (torch.ones(2, 2, 3, dtype=torch.complex64), "tensor of dtype complex64")):
        with pytest.raises(UpscalerError) as exc:
            as_image(bad)
        text = str(exc.value)
        assert text.startswith("image: ") and kind in text, text  # names the input
        assert "expected float (0..1), uint8 (0..255) or uint16 (0..65535)" in text and "Fix:" in text


def test_upscale_image_of_a_uint8_tensor_equals_the_float_image():
    up = load_upscaler(device="cpu")
    pixels = (np.arange(16 * 16 * 3) % 256).astype(np.uint8).reshape(16, 16, 3)
    from_uint8 = upscale_image(up, torch.from_numpy(pixels), 2, device="cpu")
    from_float = upscale_image(up, pixels.astype(np.float32) / 255, 2, device="cpu")
    assert torch.equal(from_uint8.image, from_float.image)
    assert from_uint8.image.mean().item() < 0.9  # not the white of unscaled 0..255


# ------------------------------------------------------------------------------------- 5. size from the header
def _big_png(path: Path, width: int, height: int, *, pixels: bool = True) -> None:
    """A valid RGB PNG of zeros (a few hundred KB however large), written in row chunks; pixels=False
    writes the header alone (Image.open reads no further)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    with open(path, "wb") as fh:
        fh.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)))
        if pixels:
            comp, row = zlib.compressobj(9), b"\x00" * (1 + 3 * width)
            data = b"".join(comp.compress(row * 500) for _ in range(height // 500))
            data += comp.compress(row * (height % 500)) + comp.flush()
            fh.write(chunk(b"IDAT", data))
        fh.write(chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def huge_png(tmp_path_factory):
    path = tmp_path_factory.mktemp("huge") / "huge.png"
    _big_png(path, 9000, 9000)
    assert path.stat().st_size < 1_000_000  # small on disk, 243 MB of pixels, 1 GB as float32
    return path


@pytest.fixture
def no_decoding(monkeypatch):
    """Any decode of an image's pixels fails the test (PNG, JPEG, ... decode through ImageFile.load)."""
    decoded = []

    def load(self):
        decoded.append(self.size)
        raise AssertionError(f"decoded a {self.size} image")

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    return decoded


def test_a_huge_image_is_refused_from_its_header_by_the_command_line(tmp_path, capsys, huge_png, no_decoding):
    limit = Image.MAX_IMAGE_PIXELS
    rc = main(["upscale", str(huge_png), "--scale", "4", "--out", str(tmp_path / "out"), "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 1 and "done 0, skipped 0, failed 1 (of 1)" in out
    assert f"failed: {huge_png}: pass 1 of 1 (x4) would be 36000x36000, over the largest side allowed" in out
    assert no_decoding == [] and not list((tmp_path / "out").rglob("*.png"))
    assert Image.MAX_IMAGE_PIXELS == limit  # PIL's decompression-bomb guard is left as it is


def test_a_huge_image_is_refused_from_its_header_by_the_library(huge_png, no_decoding):
    up = load_upscaler(device="cpu")
    with pytest.raises(UpscalerError, match="over the largest side allowed") as exc:
        upscale_image(up, huge_png, 4, device="cpu")
    assert str(huge_png) in str(exc.value)  # names the file
    with Image.open(huge_png) as lazy:  # a PIL image not yet decoded: checked before it is
        with pytest.raises(UpscalerError, match="over the largest side allowed"):
            upscale_image(up, lazy, 4, device="cpu")
    with pytest.raises(UpscalerError, match="over the largest side allowed"):
        read_image(huge_png.read_bytes(), label="huge", check=lambda w, h, c: upscale_jobs.check_request(up, w, h, c, 4))
    assert no_decoding == []


def test_the_decompression_bomb_guard_stays_in_force(tmp_path, no_decoding):
    bomb = tmp_path / "bomb.png"
    side = int((2 * Image.MAX_IMAGE_PIXELS) ** 0.5) + 16  # past PIL's error limit: refused at open
    _big_png(bomb, side, side, pixels=False)
    for call in (lambda: read_image(bomb), lambda: upscale_image(load_upscaler(device="cpu"), bomb, 0.5)):
        with pytest.raises(UpscalerError, match="decompression bomb") as exc:
            call()
        assert str(bomb) in str(exc.value) and "MAX_IMAGE_PIXELS" in str(exc.value)
    assert no_decoding == []


def test_a_normal_image_still_reads_and_upscales(tmp_path):
    src = write_photos(tmp_path, count=1)[0]
    seen = []
    image = read_image(src, check=lambda w, h, c: seen.append((w, h, c)))
    assert seen == [(64, 64, 3)] and image.shape == (1, 64, 64, 3)


# ------------------------------------------------------------------------------------- 6. names on the terminal
NASTY = "two\nlines\x1b[31mred"
ESCAPED = "two\\nlines\\x1b[31mred"  # as repr writes the control characters: one line, no escape sequence


def test_file_names_with_newlines_and_escapes_are_printed_escaped(tmp_path, capsys):
    folder = tmp_path / "in"
    src = write_photos(folder, count=1)[0]
    good = src.with_name(f"{NASTY}.png")
    src.rename(good)
    bad = folder / f"bad{NASTY}.png"
    bad.write_bytes(b"not an image at all")
    out = tmp_path / "out"
    rc = main(["upscale", str(folder), "--scale", "2", "--out", str(out), "--device", "cpu"])
    text = capsys.readouterr()
    assert rc == 1
    assert (out / f"{NASTY}_x2.png").is_file()  # the file itself keeps its name
    printed = text.out + text.err
    assert "\x1b" not in printed  # no escape sequence reaches the terminal
    escaped = ESCAPED
    lines = printed.splitlines()
    done = [ln for ln in lines if ln.startswith("[") and " done " in ln]
    assert len(done) == 1 and f"{escaped}.png -> " in done[0] and f"{escaped}_x2.png (" in done[0]
    failed = [ln for ln in text.out.splitlines() if ln.startswith("failed: ")]
    assert len(failed) == 1 and failed[0].startswith(f"failed: {folder}/bad{escaped}.png: not an image format")
    assert "done 1, skipped 0, failed 1 (of 2)" in text.out
    assert not any(ln.startswith(("lines", "red")) for ln in lines)  # no line split by a name


def test_error_lines_and_the_progress_bar_escape_names(tmp_path, capsys):
    missing = tmp_path / f"gone{NASTY}.png"
    assert main(["zoom", str(missing), "--steps", "1", "--out", str(tmp_path / "z")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "\x1b" not in err
    assert str(missing).replace(NASTY, ESCAPED) in err

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    bar = Progress(2, stream=stream)
    bar.start(f"{NASTY}.png")
    bar.finished(Outcome(f"in/{NASTY}.png", None, "failed", f"reason with {NASTY}"))
    bar.close()
    drawn = stream.getvalue().replace("\x1b[2K", "")  # the bar's own line clearing
    assert "\x1b" not in drawn and "\nlines" not in drawn
    assert f"failed: in/{ESCAPED}.png: reason with {ESCAPED}\n" in drawn
    assert progress.shown(NASTY) == ESCAPED and progress.shown("plain é.png") == "plain é.png"
