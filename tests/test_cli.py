"""The command line (`upscale`, `zoom`) and the library (api.py) on real photos with the bundled model.

Most runs call cli.main() in-process (fast); the resume test runs `python -m dreamforge_upscale` from
the checkout's parent folder as a subprocess and kills it half way.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cli_photos import receipt_of, sha256, write_corrupt, write_photos
from receipt_schema import problems
from dreamforge_upscale.api import (
    ModelPlaces, as_image, chain_of_zoom, load_prompt_model, load_upscaler, pick_device, resolve_model,
    select_upscaler, upscale_image,
)
from dreamforge_upscale.cli import main
from dreamforge_upscale.cli import upscale_jobs
from dreamforge_upscale.cli.images import Job, plan_jobs, unfinished_reason
from dreamforge_upscale.imaging.image_io import read_image
from dreamforge_upscale.upscalers import GANUpscaler, UpscalerError
from dreamforge_upscale.assets.bundled_model import bundled_model_path
from dreamforge_upscale.upscalers.receipts import Policy
from dreamforge_upscale.zoom import ZoomSettings, prepare, zoom_loop

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compact():
    return GANUpscaler.load(bundled_model_path(), device=torch.device("cpu"))


def png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


# ------------------------------------------------------------------------------------- upscale
def test_folder_sizes_receipts_corrupt_files_and_skip(tmp_path, capsys, compact):
    photos = write_photos(tmp_path / "in")
    bad = write_corrupt(tmp_path / "in")
    out = tmp_path / "out"
    rc = main(["upscale", str(tmp_path / "in"), str(tmp_path / "missing.png"), "--scale", "2.5", "--out", str(out),
               "--device", "cpu"])
    text = capsys.readouterr()
    assert rc == 1  # something failed
    assert "done 4, skipped 0, failed 3 (of 7)" in text.out
    for path in bad:
        assert f"failed: {path}: " in text.out and "replace it or remove it" in text.out
    assert f"failed: {tmp_path / 'missing.png'}: no such file or folder" in text.out
    assert "[7/7]" in text.err  # plain progress lines when stderr is not a terminal

    for src in photos:
        rel = src.relative_to(tmp_path / "in")
        output = out / rel.parent / f"{src.stem}_x2.5.png"
        with Image.open(src) as im:
            w, h, mode = im.width, im.height, im.mode
        got = png(output)
        assert got.shape[:2] == (round(h * 2.5), round(w * 2.5))
        assert got.shape[2] == (4 if mode == "RGBA" else 3)  # alpha kept, grey becomes RGB
        receipt = receipt_of(output)
        assert receipt["output_size"] == [round(w * 2.5), round(h * 2.5)]
        assert receipt["model"]["file"] == "realesr-animevideov3.pth" and receipt["policy"]["ran"] == "gan"
        assert receipt["cli"]["output_sha256"] == sha256(output) and receipt["cli"]["input_sha256"] == sha256(src)
        assert receipt["cli"]["settings"]["scale"] == 2.5
        # the library call gives the same pixels
        lib = upscale_image(compact, src, 2.5, device="cpu")
        assert np.array_equal(np.asarray(lib.pil()), got)
    assert not list(out.rglob("*.part"))

    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    rc = main(["upscale", str(tmp_path / "in"), "--scale", "2.5", "--out", str(out), "--skip-existing", "--device", "cpu"])
    assert rc == 1 and "done 0, skipped 4, failed 2 (of 6)" in capsys.readouterr().out
    assert stamps == {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}  # nothing rewritten

    for path in bad:
        path.unlink()
    rc = main(["upscale", str(photos[0]), "--scale", "3", "--out", str(out), "--device", "cpu"])
    assert rc == 0 and "done 1, skipped 0, failed 0 (of 1)" in capsys.readouterr().out
    assert png(out / "astronaut_x3.png").shape == (192, 192, 3)


def test_resume_after_a_killed_run(tmp_path):
    """`python -m dreamforge_upscale` from the checkout's parent folder, killed after its first outputs."""
    write_photos(tmp_path / "in", count=8)
    parent = tmp_path / "parent"
    parent.mkdir()
    os.symlink(REPO, parent / "dreamforge_upscale")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "dreamforge_upscale", "upscale", str(tmp_path / "in"), "--scale", "4", "--out",
           str(out), "--device", "cpu"]
    proc = subprocess.Popen(cmd, cwd=parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not list(out.rglob("*.json")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    log = proc.communicate()[0].decode()
    assert proc.returncode == -signal.SIGKILL, log
    finished = sorted(out.rglob("*.json"))
    assert 1 <= len(finished) < 8, f"kill did not land half way: {len(finished)} receipts\n{log}"
    # A run killed between writing an image and its receipt leaves an image without a receipt:
    # simulate that on one finished output, and a cut-off receipt on another when there is one.
    redo = [finished[0]]
    finished[0].unlink()
    if len(finished) > 1:
        finished[1].write_text(finished[1].read_text()[:40])
        redo.append(finished[1])
    kept = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in finished if p not in redo}

    again = subprocess.run(cmd + ["--skip-existing"], cwd=parent, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"skipped {len(kept)}," in again.stdout and f"done {8 - len(kept)}," in again.stdout
    for p, (stamp, data) in kept.items():
        assert p.stat().st_mtime_ns == stamp and p.read_bytes() == data  # not redone
    outputs = sorted(out.rglob("*.png"))
    assert len(outputs) == 8 and not list(out.rglob("*.part"))
    for output in outputs:
        receipt = receipt_of(output)
        assert receipt["cli"]["output_sha256"] == sha256(output)
        assert receipt["output_size"][0] == 4 * receipt["input_size"][0]


def test_settings_change_input_change_and_broken_receipts_are_redone(tmp_path, compact):
    src = write_photos(tmp_path / "in", count=1)[0]
    cfg = upscale_jobs.UpscaleConfig(scale=2.0, device="cpu")
    (job,), _ = plan_jobs([str(src)], tmp_path / "out", 2.0)
    assert unfinished_reason(job, cfg.settings()) == "no receipt"
    policy = Policy("gan", "gan", "impl gan: the connected GAN model")
    outcome = upscale_jobs.process_one(compact, policy, job, cfg)
    assert outcome.status == "done", outcome.reason
    assert dataclasses.asdict(policy) == receipt_of(job.output)["policy"]
    assert unfinished_reason(job, cfg.settings()) is None
    assert unfinished_reason(job, upscale_jobs.UpscaleConfig(scale=2.0, tile=64).settings()) == "made with other settings"
    original = src.read_bytes()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(src)
    assert unfinished_reason(job, cfg.settings()) == "input changed"
    src.write_bytes(original)
    job.output.write_bytes(b"x")
    assert unfinished_reason(job, cfg.settings()) == "image does not match its receipt"
    job.output.unlink()
    assert unfinished_reason(job, cfg.settings()) == "image missing"
    job.receipt.write_text("{}")
    assert unfinished_reason(job, cfg.settings()) == "receipt incomplete"
    # an output folder that cannot be written: that image fails, reported (OSError), nothing raised
    blocked = Job(src, tmp_path / "a_file" / "x.png", tmp_path / "a_file" / "x.json")
    (tmp_path / "a_file").write_text("not a folder")
    failed = upscale_jobs.process_one(compact, policy, blocked, cfg)
    assert failed.status == "failed" and "a_file" in failed.reason


def test_inputs_globs_collisions_and_unmatched(tmp_path):
    folder = tmp_path / "in"
    write_photos(folder)
    (folder / "notes.txt").write_text("not an image")
    (folder / "astronaut.jpg").write_bytes((folder / "astronaut.png").read_bytes())
    (tmp_path / "empty").mkdir()
    jobs, problems = plan_jobs([str(folder / "*.png"), str(folder / "astronaut.jpg"), str(folder / "notes.txt"),
                                str(tmp_path / "empty"), str(folder / "*.gif"), str(folder / "rgba.png")],
                               tmp_path / "out", 2)
    assert [j.output.name for j in jobs] == ["astronaut_x2.png", "camera_grey_x2.png", "rgba_x2.png"]
    reasons = {Path(p.input).name: p.reason for p in problems}
    assert "would overwrite the output of" in reasons["astronaut.jpg"]
    assert reasons["notes.txt"].startswith("not an image file name")
    assert reasons["empty"].startswith("folder has no images")
    assert reasons["*.gif"] == "the pattern matches no image files"
    # the output folder inside an input folder is not read back as input
    jobs, _ = plan_jobs([str(folder)], folder / "out", 2)
    (folder / "out").mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(folder / "out" / "astronaut_x2.png")
    again, _ = plan_jobs([str(folder)], folder / "out", 2)
    assert [j.source for j in again] == [j.source for j in jobs]


def test_command_line_errors(tmp_path, capsys, monkeypatch):
    src = write_photos(tmp_path, count=1)[0]
    with pytest.raises(SystemExit) as exc:
        main(["upscale", str(src), "--impl", "bogus"])
    assert exc.value.code == 2
    assert main(["upscale", str(src), "--scale", "0", "--out", str(tmp_path / "o")]) == 1
    assert "--scale must be a positive number" in capsys.readouterr().err
    assert main(["upscale", str(src), "--model", "nope.pth", "--out", str(tmp_path / "o")]) == 1
    assert "'nope.pth' not found (searched:" in capsys.readouterr().err
    assert main(["upscale", str(src), "--impl", "diffusion", "--out", str(tmp_path / "o")]) == 1
    assert "impl diffusion needs the Stable Diffusion x4 upscaler" in capsys.readouterr().err
    assert main(["upscale", str(src), "--ray", "--actors", "-1", "--out", str(tmp_path / "o")]) == 1
    assert "--actors must be 0" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    assert main(["upscale", str(src), "--ray", "--out", str(tmp_path / "o")]) == 1
    assert "pip install 'dreamforge-upscale[cluster]'" in capsys.readouterr().err


def test_interrupt_stops_with_a_summary(tmp_path, capsys, monkeypatch):
    write_photos(tmp_path / "in", count=3)
    real = upscale_jobs.process_one
    calls = []

    def interrupted_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(upscale_jobs, "process_one", interrupted_second)
    assert main(["upscale", str(tmp_path / "in"), "--scale", "2", "--out", str(tmp_path / "o"), "--device", "cpu"]) == 130
    out = capsys.readouterr().out
    assert "done 1, skipped 0, failed 0 (of 1)" in out and "interrupted after 1 of 3" in out


def test_assets_subcommand_is_delegated(capsys, tmp_path):
    assert main(["assets", "list", "--models-root", str(tmp_path)]) == 0
    assert "realesr-animevideov3.pth" in capsys.readouterr().out


# ------------------------------------------------------------------------------------- zoom
def test_zoom_states_equal_zoom_loop(tmp_path, capsys, compact):
    src = write_photos(tmp_path, count=1)[0]
    rc = main(["zoom", str(src), "--steps", "2", "--process-size", "64", "--prompt", "a photo", "--seed", "7",
               "--out", str(tmp_path / "z"), "--device", "cpu"])
    assert rc == 0, capsys.readouterr()
    folder = tmp_path / "z" / "astronaut_zoom"
    settings = ZoomSettings(mode="recursive_multiscale", process_size=64, user_prompt="a photo", seed=7,
                            device=torch.device("cpu"))
    loop = zoom_loop(compact, as_image(src), 2, settings)  # what the Chain-of-Zoom Loop node calls
    for n, state in enumerate(loop.states[0]):
        assert np.array_equal(png(folder / f"x{n}.png"), np.asarray(state)), f"x{n}"
    assert (folder / "prompts.txt").read_text() == "x1: a photo\nx2: a photo\n"
    assert Image.open(folder / "strip.png").size == (64 * 3, 64)
    receipt = json.loads((folder / "receipt.json").read_text())
    assert not problems(receipt), problems(receipt)[:3]
    assert receipt["kind"] == "zoom_loop" and receipt["steps"] == 2 and receipt["prompts"] == [["a photo", "a photo"]]
    assert [r["step"] for r in receipt["step_receipts"]] == [1, 2]
    # a baseline mode runs without a model
    assert main(["zoom", str(src), "--steps", "1", "--process-size", "64", "--mode", "bicubic",
                 "--out", str(tmp_path / "b")]) == 0
    x0 = prepare(Image.open(src).convert("RGB"), 64)
    expected = x0.crop((24, 24, 40, 40)).resize((64, 64), Image.Resampling.BICUBIC)
    assert np.array_equal(png(tmp_path / "b" / "astronaut_zoom" / "x1.png"), np.asarray(expected))


# ------------------------------------------------------------------------------------- library
def test_library_surface_and_its_errors(tmp_path, compact):
    src = write_photos(tmp_path, count=1)[0]
    up = load_upscaler(device="cpu")
    assert up.source.file == "realesr-animevideov3.pth"
    result = upscale_image(up, Image.open(src), 2, device="cpu")
    assert result.image.shape == (1, 128, 128, 3) and result.receipt.to_dict()["output_size"] == [128, 128]
    assert np.array_equal(np.asarray(result.pil()), np.asarray(upscale_image(compact, read_image(src), 2).pil()))
    zoom = chain_of_zoom(up, np.asarray(Image.open(src)), 1, process_size=32, device="cpu")
    assert len(zoom.states) == 2 and zoom.strip().size == (64, 32) and zoom.prompts == [""]
    _, policy = select_upscaler(2.0, device="cpu")
    assert dataclasses.asdict(policy) == {"impl": "auto", "ran": "gan", "reason": "impl auto: the connected GAN model"}

    with pytest.raises(UpscalerError, match="impl must be one of"):
        select_upscaler(2.0, impl="fast")
    with pytest.raises(UpscalerError, match="not a torch device name"):
        pick_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(UpscalerError, match="CUDA is not available"):
            pick_device("cuda")
    with pytest.raises(UpscalerError, match="image must be a path, PIL image"):
        as_image([1, 2, 3])
    with pytest.raises(UpscalerError, match="has no models/ folder"):
        resolve_model("x.pth", ModelPlaces(comfyui_root=tmp_path))
    with pytest.raises(UpscalerError, match="'missing' not found in"):
        resolve_model("diffusers/missing", ModelPlaces(models_root=tmp_path))
    with pytest.raises(UpscalerError, match="is neither a folder nor a model in"):
        load_prompt_model("no-such-vlm", places=ModelPlaces(models_root=tmp_path))


def test_comfyui_root_and_models_root_are_searched(tmp_path):
    comfy_models = tmp_path / "ComfyUI" / "models" / "upscale_models"
    comfy_models.mkdir(parents=True)
    shutil.copy(bundled_model_path(), comfy_models / "my_x4.pth")
    places = ModelPlaces(models_root=tmp_path / "root", comfyui_root=tmp_path / "ComfyUI")
    assert resolve_model("my_x4.pth", places) == comfy_models / "my_x4.pth"
    up = load_upscaler("my_x4.pth", device="cpu", places=places)
    assert up.source.file == "my_x4.pth" and up.scale == 4


# ------------------------------------------------------------------------------------- packaging
def test_pyproject_lists_every_subpackage_and_data_file():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    skip = {"tests", "scripts", "benchmarks", "example_workflows", "docs", ".venv", ".git", ".ci", "out", "build"}
    found = {"dreamforge_upscale"} | {
        "dreamforge_upscale." + ".".join(p.parent.relative_to(REPO).parts)
        for p in REPO.rglob("__init__.py") if p.parent != REPO and p.relative_to(REPO).parts[0] not in skip
    }
    assert found == listed, "add the missing sub-packages to [tool.setuptools] packages in pyproject.toml"
    data = config.get("package-data", {})
    for pkg in listed - {"dreamforge_upscale"}:
        folder = REPO.joinpath(*pkg.split(".")[1:])
        for f in folder.rglob("*"):
            if f.is_file() and f.suffix not in (".py", ".pyc") and "__pycache__" not in f.parts:
                owner = next((p for p in sorted(listed, key=len, reverse=True)
                              if f.is_relative_to(REPO.joinpath(*p.split(".")[1:]))), None)
                rel = f.relative_to(REPO.joinpath(*owner.split(".")[1:])).as_posix()
                assert any(Path(rel).match(g) for g in data.get(owner, [])), f"{rel} of {owner} is not in package-data"


def test_pip_install_gives_the_console_script(tmp_path):
    """Build the wheel from a copy of the checkout, install it into a folder, run `dreamforge-upscale`."""
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".venv", ".git", "__pycache__", "out", "test-artifacts"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path / "wheel"), "-q"], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    wheel = next((tmp_path / "wheel").glob("dreamforge_upscale-*.whl"))
    target = tmp_path / "site"
    inst = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), str(wheel), "-q"],
                          capture_output=True, text=True, timeout=300)
    assert inst.returncode == 0, inst.stderr
    assert (target / "dreamforge_upscale" / "assets" / "bundled" / "realesr-animevideov3.pth").is_file()
    photo = write_photos(tmp_path / "in", count=1)[0]
    env = {**os.environ, "PYTHONPATH": str(target)}
    run = subprocess.run([str(target / "bin" / "dreamforge-upscale"), "upscale", str(photo), "--scale", "2", "--out",
                          str(tmp_path / "out"), "--device", "cpu"], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert png(tmp_path / "out" / "astronaut_x2.png").shape == (128, 128, 3)
