"""Every command README.md and docs/ tell a user to type, run as written (tests/doc_commands.py reads them).

Each fenced `bash` / `sh` / `python` block of the docs is one test. A runner, chosen by the block's first
command, lays out what a user would have beside it (a photo, a models folder, a ComfyUI folder) and runs
every line of the block unchanged in bash, on this suite's venv. Only the surroundings differ from a
user's machine, through the environment: no network (pip reads no index, downloads go to a closed proxy
port, `git clone` of the project's URL reads this checkout), and benchmarks run their own code path at
tiny sizes (DREAMFORGE_BENCH_SMOKE=1, scripts/bench_smoke.py). A block no runner knows fails: a new command
in the docs needs a runner here, or belongs in a `text` block if it is a synopsis, not a command.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

from doc_commands import REPO_ROOT, Block, doc_files, documented_blocks
from receipt_schema import problems

from dreamforge_upscale.assets.catalog import bundle_specs

BLOCKS = documented_blocks()
VENV_BIN = Path(sys.executable).parent
SHARED_WEIGHTS = Path(os.environ.get("DF_SHARED_WEIGHTS", REPO_ROOT.parent / "shared" / "weights"))
PROJECT_URL = "https://github.com/dreamforge/dreamforge-upscale"  # pyproject.toml [project.urls]
RUNNERS: list[tuple[re.Pattern, Callable[[Block, Path], None]]] = []


def runner(pattern: str):
    def register(fn):
        RUNNERS.append((re.compile(pattern), fn))
        return fn
    return register


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LOOPBACK = "127.0.0.1,localhost"  # Ray's own gRPC reaches its local processes (gRPC honours *_proxy)


def offline_env(tmp: Path, **extra: str) -> dict:
    """This venv first on PATH, no package index, every download refused at once, empty caches."""
    proxy = f"http://127.0.0.1:{closed_port()}"
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", "PIP_NO_INDEX": "1",
           "PIP_DISABLE_PIP_VERSION_CHECK": "1", "HTTP_PROXY": proxy, "HTTPS_PROXY": proxy, "http_proxy": proxy,
           "https_proxy": proxy, "NO_PROXY": LOOPBACK, "no_proxy": LOOPBACK, "HF_HUB_OFFLINE": "1",
           "TORCH_HOME": str(tmp / "cache" / "torch"), "HF_HOME": str(tmp / "cache" / "hf"),
           "DF_MODELS_ROOT": str(tmp / "models")}
    env.pop("VIRTUAL_ENV", None)
    env.update(extra)
    return env


def run_line(command: str, cwd: Path, env: dict, timeout: float) -> subprocess.CompletedProcess:
    """One documented line, unchanged, in bash (so quotes, globs and `~` mean what they mean to a user)."""
    proc = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)
    return proc


def expect_ok(proc: subprocess.CompletedProcess, command: str, block: Block) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, (f"{block.id}: `{command}` exited {proc.returncode}\n--- stdout\n"
                                  f"{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}")
    return proc


def run_block(block: Block, cwd_for: Callable[[str], Path], env: dict, timeout: float = 300) -> list:
    """Every command of the block in order, each in one bash (a `cd` line moves the following ones)."""
    done, cwd = [], None
    for command in block.commands:
        here = cwd or cwd_for(command)
        if command.startswith("cd "):
            cwd = (here / os.path.expanduser(command[3:].strip())).resolve()
            assert cwd.is_dir(), f"{block.id}: `{command}`: no such folder {cwd}"
            continue
        done.append(expect_ok(run_line(command, here, env, timeout), command, block))
    return done


def need_shared(name: str) -> Path:
    path = SHARED_WEIGHTS / name
    if not path.is_file():
        pytest.skip(f"{path} is missing (../shared/weights beside the checkout, or DF_SHARED_WEIGHTS)")
    return path


def write_user_photos(folder: Path) -> None:
    """What the CLI examples name: photo.jpg, frames/ and shots/**/ (small crops of real photos)."""
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(data.astronaut()[0:96, 160:256]).save(folder / "photo.jpg", quality=95)
    (folder / "frames").mkdir()
    for i, crop in enumerate((data.coffee()[100:164, 200:264], data.chelsea()[80:144, 150:214])):
        Image.fromarray(crop).save(folder / "frames" / f"frame_{i:03d}.png")
    (folder / "shots" / "day1").mkdir(parents=True)
    Image.fromarray(data.rocket()[100:148, 200:248]).save(folder / "shots" / "day1" / "launch.png")


def installed_env(tmp: Path) -> tuple[dict, Path]:
    """What `pip install .` gives a user, installed offline into a target folder on PYTHONPATH."""
    target = tmp / "site"
    env = offline_env(tmp, PIP_TARGET=str(target), PIP_NO_DEPS="1", PIP_NO_BUILD_ISOLATION="0",
                      PYTHONPATH=str(target))
    env["PATH"] = f"{target / 'bin'}{os.pathsep}{env['PATH']}"
    return env, target


# ------------------------------------------------------------------------------------------- README
@runner(r"^bash scripts/demo\.sh$")
def readme_setup(block: Block, tmp: Path) -> None:
    """The README's two set-up commands: the main job as a newcomer runs it, and the test command."""
    assert block.doc == "README.md" and block.commands == ("bash scripts/demo.sh", "bash scripts/test.sh"), \
        "the README's first block holds exactly the two set-up commands"
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    demo = expect_ok(run_line(block.commands[0], REPO_ROOT, env, timeout=900), block.commands[0], block)
    printed = dict(re.findall(r"^(image|receipt):\s+(.+)$", demo.stdout, re.M))
    assert set(printed) == {"image", "receipt"}, f"the demo prints where its results are:\n{demo.stdout}"
    image, record = Path(printed["image"]), json.loads(Path(printed["receipt"]).read_text())
    receipt = record["receipt"]
    assert not problems(receipt), problems(receipt)[:3]
    with Image.open(image) as im:
        assert im.size == tuple(receipt["output_size"]) == tuple(4 * s for s in receipt["input_size"]), im.size
        assert json.loads(im.text["dreamforge_receipt"]) == receipt  # the saved picture keeps its receipt
    assert receipt["input_size"] == [768, 768] and image.name == "example_x4.png", "ComfyUI's own example.png"
    assert image.parent == REPO_ROOT / "out", "the README says results land in out/"

    # The test command is the suite running this test: .ci/run must be exactly it, and it must start.
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    assert re.search(r'^exec bash scripts/test\.sh "\$@"$', ci, re.M), ".ci/run runs the README's test command"
    collect = f"{block.commands[1]} --collect-only -q {Path(__file__).relative_to(REPO_ROOT)}"
    out = expect_ok(run_line(collect, REPO_ROOT, env, timeout=300), collect, block).stdout
    assert re.search(r"\d+ tests? collected", out), out[-2000:]


@runner(r"^cd ComfyUI/custom_nodes$")
def install_into_comfyui(block: Block, tmp: Path) -> None:
    """The install section, in a ComfyUI folder: the clone is this checkout, pip finds everything installed;
    ComfyUI's torch is left alone (requirements.txt names no torch, and the install changes none); then a
    real ComfyUI loads the cloned folder as a custom node pack."""
    from importlib import metadata

    from comfy_headless import ComfyServer
    from packaging.requirements import Requirement

    # requirements.txt of this tree (a clone gets the last commit): ComfyUI provides torch, pip must not
    lines = [ln.split("#")[0].strip() for ln in (REPO_ROOT / "requirements.txt").read_text().splitlines()]
    named = {Requirement(ln).name.lower() for ln in lines if ln and not ln.startswith("-")}
    assert not named & {"torch", "torchvision", "torchaudio"}, f"requirements.txt would resolve torch: {named}"
    torch_before = metadata.version("torch")

    (tmp / "ComfyUI" / "custom_nodes").mkdir(parents=True)
    env = offline_env(tmp, GIT_CONFIG_COUNT="1", GIT_CONFIG_KEY_0=f"url.{REPO_ROOT.as_uri()}.insteadOf",
                      GIT_CONFIG_VALUE_0=PROJECT_URL)
    done = run_block(block, lambda _: tmp, env)
    pip_output = "".join(p.stdout + p.stderr for p in done)
    assert "Uninstalling torch" not in pip_output and metadata.version("torch") == torch_before, pip_output[-3000:]
    clone = tmp / "ComfyUI" / "custom_nodes" / "dreamforge-upscale"
    assert (clone / "__init__.py").is_file() and (clone / "assets" / "bundled").is_dir()
    server = ComfyServer(tmp / "server", pack_root=clone, pack_name="dreamforge-upscale-cloned")
    try:
        server.start()
        assert not server.import_failures("dreamforge"), server.import_failures("dreamforge")
        info = server.object_info()
        assert {"DreamForgeLoadUpscaler", "DreamForgeESRGANUpscale", "DreamForgeColorFix"} <= set(info)
    finally:
        server.cleanup()


@runner(r"^pip install \.$")
def command_line(block: Block, tmp: Path) -> None:
    """`pip install .` (offline, into a target folder), then the command line on small real photos."""
    sandbox = tmp / "work"
    write_user_photos(sandbox)
    env, target = installed_env(tmp)
    ray_head = any("--ray auto" in c for c in block.commands)
    if ray_head:
        pytest.importorskip("ray", reason="Ray is not installed (pip install 'dreamforge-upscale[cluster]')")
        (tmp / "models" / "upscale_models").mkdir(parents=True)
    if any("RealESRGAN_x4plus" in c for c in block.commands):
        (tmp / "models" / "upscale_models").mkdir(parents=True, exist_ok=True)
        (tmp / "models" / "upscale_models" / "RealESRGAN_x4plus.pth").symlink_to(need_shared("RealESRGAN_x4plus.pth"))
    env["RAY_TMPDIR"] = str(Path("/tmp") / f"ray-doc-{os.getpid()}")  # short: Ray's socket paths are limited
    if ray_head:
        # `--ray auto` joins a running cluster: start one, as a user would have
        expect_ok(run_line(f"ray start --head --num-cpus 2 --include-dashboard false --node-ip-address 127.0.0.1 "
                           f"--port {closed_port()} --disable-usage-stats --temp-dir {env['RAY_TMPDIR']}",
                           sandbox, env, 180), "ray start", block)
    try:
        run_block(block, lambda c: REPO_ROOT if c.startswith("pip ") else sandbox, env, timeout=600)
    finally:
        if ray_head:
            run_line("ray stop --force", sandbox, env, 120)
    assert (target / "bin" / "dreamforge-upscale").is_file()
    for command in block.commands:
        if command.startswith("dreamforge-upscale upscale"):
            out = sandbox / re.search(r"--out (\S+)", command).group(1)
            receipts = sorted(out.rglob("*.json"))
            assert receipts, f"`{command}` wrote no receipt under {out}"
            for path in receipts:
                assert not problems(json.loads(path.read_text())), path
        elif command.startswith("dreamforge-upscale zoom"):
            receipt = next((sandbox / "zoomed").rglob("receipt.json"))
            assert not problems(json.loads(receipt.read_text())), receipt


@runner(r"^git clone \S+ dreamforge_upscale$")
def checkout_as_module(block: Block, tmp: Path) -> None:
    """A clone under a module name, run with `python -m` from its parent folder (nothing installed)."""
    sandbox = tmp / "work"
    write_user_photos(sandbox)
    env = offline_env(tmp, GIT_CONFIG_COUNT="1", GIT_CONFIG_KEY_0=f"url.{REPO_ROOT.as_uri()}.insteadOf",
                      GIT_CONFIG_VALUE_0=PROJECT_URL)
    env.pop("PYTHONPATH", None)  # the pack comes from the clone alone
    run_block(block, lambda _: sandbox, env, timeout=600)
    outputs = sorted((sandbox / "upscaled").glob("*.png"))
    assert outputs, "python -m <clone> upscale wrote no image"
    with Image.open(outputs[0]) as im, Image.open(sandbox / "photo.jpg") as src:
        assert im.size == (2 * src.width, 2 * src.height)


@runner(r"^python scripts/dreamforge_assets\.py ")
def model_assets(block: Block, tmp: Path) -> None:
    """The assets command on an empty models root, offline, with a local mirror holding the x4plus file
    of ../shared. That file is a stand-in rebuilt from another release's weights (its PROVENANCE.md), so its
    bytes are not the upstream release's: `prefetch` must refuse it naming both hashes and install nothing;
    `verify` and `list` then run on what is there. A download of the true bytes is proven in
    tests/test_assets_download.py against a local HTTP server."""
    mirror = tmp / "mirror"
    mirror.mkdir()
    stand_in = need_shared("RealESRGAN_x4plus.pth")
    (mirror / "RealESRGAN_x4plus.pth").symlink_to(stand_in)
    env = offline_env(tmp, DF_LOCAL_MIRROR=str(mirror))
    models = tmp / "models"
    outputs = []
    for command in block.commands:
        proc = run_line(command, REPO_ROOT, env, 300)
        if " prefetch " in f" {command} ":
            pinned = next(s.sha256 for s in bundle_specs("upscalers", ["RealESRGAN_x4plus"]))
            actual = hashlib.sha256(stand_in.read_bytes()).hexdigest()
            text = proc.stdout + proc.stderr
            assert proc.returncode != 0 and pinned in text and actual in text, (
                f"{block.id}: `{command}` should refuse the stand-in naming both hashes\n{text[-3000:]}")
            assert not list(models.rglob("RealESRGAN_x4plus.pth*")), "a refused file was installed"
        else:
            outputs.append(expect_ok(proc, command, block).stdout)
    assert outputs, f"{block.id}: nothing but prefetch ran"


@runner(r"^from dreamforge_upscale\.api import ")
def library(block: Block, tmp: Path) -> None:
    """The library example as a program, in a folder with photo.jpg and ~/ComfyUI holding the x4plus file."""
    sandbox = tmp / "work"
    write_user_photos(sandbox)
    env, _ = installed_env(tmp)
    expect_ok(subprocess.run([sys.executable, "-m", "pip", "install", "-q", str(REPO_ROOT)], env=env,
                             capture_output=True, text=True, timeout=300), "pip install .", block)
    home = tmp / "home"
    (home / "ComfyUI" / "models" / "upscale_models").mkdir(parents=True)
    (home / "ComfyUI" / "models" / "upscale_models" / "RealESRGAN_x4plus.pth").symlink_to(
        need_shared("RealESRGAN_x4plus.pth"))
    env["HOME"] = str(home)
    proc = subprocess.run([sys.executable, "-"], input=block.first, cwd=sandbox, env=env, capture_output=True,
                          text=True, timeout=600)
    expect_ok(proc, "the library example", block)
    for name in re.findall(r'save\("([^"]+)"\)', block.first):
        assert (sandbox / name).is_file(), f"the example saves {name}"


# ------------------------------------------------------------------------------------------- benchmarks, scripts
@runner(r"^\.venv/bin/python (benchmarks|scripts)/")
def repository_scripts(block: Block, tmp: Path) -> None:
    """Benchmark and maintenance scripts, as written, on their own code path at tiny sizes (numbers mean
    nothing): DREAMFORGE_BENCH_SMOKE=1. Files they write go to a scratch folder, not the checkout."""
    written = tmp / "written"
    env = {**os.environ, "DREAMFORGE_BENCH_SMOKE": "1", "DREAMFORGE_BENCH_OUT": str(written)}
    for command in block.commands:
        assert command.startswith(".venv/bin/python "), f"{block.id}: `{command}`: one kind of command a block"
    run_block(block, lambda _: REPO_ROOT, env, timeout=600)
    schema = written / "receipt.schema.json"
    if "scripts/write_receipt_schema.py" in " ".join(block.commands):
        assert schema.is_file(), "write_receipt_schema.py wrote no schema"
        assert json.loads(schema.read_text()) == json.loads((REPO_ROOT / "docs" / "receipt.schema.json").read_text()), \
            "docs/receipt.schema.json is not what the receipt classes generate: run the documented command"


# ------------------------------------------------------------------------------------------- the tests
def _runner_for(block: Block):
    return next((fn for pattern, fn in RUNNERS if pattern.search(block.first)), None)


def test_docs_have_commands():
    assert BLOCKS and BLOCKS[0].id.startswith("README.md") and BLOCKS[0].first == "bash scripts/demo.sh"
    docs = {b.doc for b in BLOCKS}
    assert {"README.md", "docs/cli.md", "docs/benchmarks.md"} <= docs, docs


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_documented_block_runs(block: Block, tmp_path: Path):
    fn = _runner_for(block)
    assert fn is not None, (f"{block.id}: nothing runs `{block.first}`: add a runner to tests/test_doc_commands.py, "
                            "or show a synopsis in a ```text block")
    assert block.commands, f"{block.id}: an empty command block"
    fn(block, tmp_path)


COMMAND = r"(?:bash|python|\.venv/bin/python|dreamforge-upscale|pip) "
INLINE = re.compile(rf"`({COMMAND}[^`]+)`|^(?: {{4,}}|\t)({COMMAND}.+)$", re.M)  # quoted, or an indented block


def test_inline_commands_are_run_somewhere():
    """A command quoted in a sentence (or in an indented block) is one of the fenced commands the tests run,
    or the start of one (a synopsis). ADRs are records of decisions, not instructions: not read."""
    fenced = [c for b in BLOCKS if b.tag != "python" for c in b.commands]
    loose = []
    for path in doc_files():
        if path.parent.name == "adr":
            continue
        for m in INLINE.finditer(path.read_text(encoding="utf-8")):
            text = " ".join((m.group(1) or m.group(2)).split("#")[0].split())
            stem = re.split(r"\s(?:\.\.\.|\[|<|[A-Z]{2,}\b)", text)[0].strip()
            if not any(c.startswith(stem) for c in fenced):
                loose.append(f"{path.relative_to(REPO_ROOT)}: `{text}`")
    assert not loose, "commands in prose that no fenced block runs:\n" + "\n".join(loose)
