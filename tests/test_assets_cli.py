"""The assets command line, run as a subprocess, against a loopback HTTP server emulating a file host
and the Hugging Face hub (tests/asset_server.py): prefetch of a mixed manifest, list, verify, errors.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from asset_server import AssetServer, closed_port, sha256  # noqa: E402 - conftest puts tests/ on sys.path

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "assets" / "bundled" / "realesr-animevideov3.pth"
HF_REPO = "dreamforge-test/tiny-x4"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def tiny_diffusers_files() -> dict[str, bytes]:
    """A real (tiny) diffusers folder: model_index.json, a 4-channel AutoencoderKL, two schedulers."""
    import tempfile

    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        AutoencoderKL(down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                      block_out_channels=(8,), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                      sample_size=16).save_pretrained(root / "vae")
        DDIMScheduler(prediction_type="v_prediction").save_pretrained(root / "scheduler")
        DDPMScheduler().save_pretrained(root / "low_res_scheduler")
        files = {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    files["model_index.json"] = json.dumps({
        "_class_name": "StableDiffusionUpscalePipeline", "_diffusers_version": "0.42.1",
        "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "DDIMScheduler"],
        "low_res_scheduler": ["diffusers", "DDPMScheduler"], "max_noise_level": 350,
    }, indent=1).encode()
    files["README.md"] = b"# tiny x4 (test)\n"
    files["vae/diffusion_pytorch_model.bin"] = b"a .bin twin the downloader must skip"
    files["x4-upscaler-ema.ckpt"] = b"the big single file the manifest ignores"
    return files


def cli(*args, env: dict | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts" / "dreamforge_assets.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The server, a manifest with both entry types, an env with empty caches, and one real prefetch."""
    tmp = tmp_path_factory.mktemp("assets-cli")
    with AssetServer() as server:
        gan_url = server.add("/releases/v1/tiny_compact.pth", BUNDLED.read_bytes())
        files = tiny_diffusers_files()
        server.add_snapshot(HF_REPO, COMMIT, files,
                            lfs={n for n in files if n.endswith((".safetensors", ".bin", ".ckpt"))})
        manifest = tmp / "manifest.json"
        manifest.write_text(json.dumps({"assets": [
            {"type": "registry_model", "name": "tiny-compact", "url": gan_url, "sha256": sha256(BUNDLED.read_bytes()),
             "filename": "tiny_compact.pth", "folder": "upscale_models", "licence": "BSD-3-Clause"},
            {"type": "diffusers_cache", "name": "tiny-x4", "repo": HF_REPO, "revision": "main", "folder": "diffusers",
             "ignore": ["*.ckpt"]},
        ]}))
        env = {"HF_ENDPOINT": server.base, "TORCH_HOME": str(tmp / "torch"), "HF_HUB_CACHE": str(tmp / "hf"),
               "DF_LOCAL_MIRROR": "", "DF_MODELS_ROOT": str(tmp / "unused-default-root")}
        root = tmp / "models"
        run = cli("prefetch", "--manifest", manifest, "--models-root", root, env=env)
        yield {"server": server, "root": root, "manifest": manifest, "env": env, "run": run, "files": files,
               "gan_url": gan_url, "tmp": tmp}


def test_prefetch_mixed_manifest_installs_both_verified(world):
    run, root, server, files = world["run"], world["root"], world["server"], world["files"]
    assert run.returncode == 0, run.stderr
    assert "tiny-compact: download:" in run.stdout and "tiny-x4: download:" in run.stdout
    gan = root / "upscale_models" / "tiny_compact.pth"
    assert gan.read_bytes() == BUNDLED.read_bytes()
    side = json.loads((root / "upscale_models" / "tiny_compact.pth.dreamforge.json").read_text())
    assert side["source"] == world["gan_url"] and side["sha256"] == sha256(BUNDLED.read_bytes())
    assert side["size"] == BUNDLED.stat().st_size and side["date"].endswith("Z") and side["licence"] == "BSD-3-Clause"

    snap = root / "diffusers" / "tiny-x4"
    wanted = {n for n in files if not n.endswith((".ckpt", ".bin"))}  # ignored pattern + .bin twin of a .safetensors
    assert {p.relative_to(snap).as_posix() for p in snap.rglob("*") if p.is_file()} == wanted
    for name in wanted:
        assert (snap / name).read_bytes() == files[name], name
    sside = json.loads((root / "diffusers" / "tiny-x4.dreamforge.json").read_text())
    assert (sside["repo"], sside["revision"], sside["commit"]) == (HF_REPO, "main", COMMIT)
    assert sside["source"] == f"{HF_REPO}@{COMMIT}" and sside["endpoint"] == server.base
    assert sside["files"] == {n: sha256(files[n]) for n in wanted}
    assert not [p for p in root.rglob("*") if p.name.endswith((".part", ".old"))]  # nothing half-done left

    api = server.requests("/api/models/")
    assert [(r["path"], r["query"]) for r in api] == [(f"/api/models/{HF_REPO}/revision/main", "blobs=true")]
    fetched = {r["path"] for r in server.requests(f"/{HF_REPO}/resolve/")}
    assert fetched == {f"/{HF_REPO}/resolve/{COMMIT}/{n}" for n in wanted}  # pinned to the commit, skips honoured
    assert "tiny_compact.pth" in run.stderr and "/s" in run.stderr  # progress bar: file, bytes, rate


def test_second_prefetch_downloads_nothing(world):
    before = len(world["server"].requests())
    run = cli("prefetch", "--manifest", world["manifest"], "--models-root", world["root"], env=world["env"])
    assert run.returncode == 0, run.stderr
    assert "tiny-compact: installed:" in run.stdout and "tiny-x4: installed:" in run.stdout
    assert len(world["server"].requests()) == before


def test_list_shows_table_and_json(world):
    root = world["root"]
    run = cli("list", "--models-root", root, env=world["env"])
    assert run.returncode == 0, run.stderr
    header, rule, *rows = run.stdout.splitlines()
    assert header.split() == ["name", "folder", "size", "sha256", "source", "location"]
    by_name = {r.split()[0]: r for r in rows}
    gan_sha = sha256(BUNDLED.read_bytes())
    assert gan_sha[:12] in by_name["tiny_compact.pth"] and world["gan_url"] in by_name["tiny_compact.pth"]
    assert "upscale_models" in by_name["tiny_compact.pth"] and "2.4 MiB" in by_name["tiny_compact.pth"]
    assert f"{HF_REPO}@{COMMIT}" in by_name["tiny-x4/"] and "diffusers" in by_name["tiny-x4/"]
    assert "bundled" in by_name["realesr-animevideov3.pth"]

    data = json.loads(cli("list", "--json", "--models-root", root, env=world["env"]).stdout)
    models = {m["name"]: m for m in data["models"]}
    assert data["models_root"] == str(root.resolve())
    assert models["tiny_compact.pth"]["sha256"] == gan_sha and models["tiny_compact.pth"]["size"] == BUNDLED.stat().st_size
    assert models["tiny-x4"]["type"] == "folder" and models["tiny-x4"]["provenance"]["commit"] == COMMIT


def test_verify_passes_then_catches_corruption_and_broken_models(world):
    root = world["tmp"] / "models-verify"
    shutil.copytree(world["root"], root)
    ok = cli("verify", "--manifest", world["manifest"], "--models-root", root, env=world["env"])
    assert ok.returncode == 0, ok.stdout + ok.stderr
    statuses = {line.split()[2]: line.split()[0] for line in ok.stdout.splitlines()[2:]}
    assert statuses == {"tiny_compact.pth": "ok", "tiny-x4": "ok"}  # hashes and offline load checks passed

    gan = root / "upscale_models" / "tiny_compact.pth"
    data = bytearray(gan.read_bytes())
    data[len(data) // 2] ^= 0xFF
    gan.write_bytes(bytes(data))
    weights = root / "diffusers" / "tiny-x4" / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    (root / "upscale_models" / "junk.pth").write_bytes(os.urandom(2048))  # placed by hand, not a model
    bad = cli("verify", "--models-root", root, env=world["env"])
    assert bad.returncode == 1
    lines = {line.split()[2]: line for line in bad.stdout.splitlines()[2:]}
    assert lines["tiny_compact.pth"].startswith("mismatch")
    assert sha256(BUNDLED.read_bytes()) in bad.stderr and sha256(bytes(data)) in bad.stderr  # both hashes named
    assert lines["tiny-x4"].startswith("mismatch") and "vae/diffusion_pytorch_model.safetensors" in lines["tiny-x4"]
    assert lines["junk.pth"].startswith("load-failed")
    assert lines["realesr-animevideov3.pth"].startswith("ok")  # the bundled model checks out

    # a hand-placed diffusers folder (no sidecar) still gets the offline component load check
    (root / "diffusers" / "tiny-x4.dreamforge.json").unlink()
    (root / "diffusers" / "tiny-x4" / "scheduler" / "scheduler_config.json").write_text("{ not json")
    gan.write_bytes(BUNDLED.read_bytes())
    again = cli("verify", "--models-root", root, env=world["env"])
    lines = {line.split()[2]: line for line in again.stdout.splitlines()[2:]}
    assert again.returncode == 1 and lines["tiny_compact.pth"].startswith("ok")
    assert lines["tiny-x4"].startswith("load-failed") and "scheduler (diffusers.DDIMScheduler)" in lines["tiny-x4"]


def test_offline_404_and_bad_manifest_fail_clearly(world, tmp_path):
    dead = f"http://127.0.0.1:{closed_port()}/releases/offline.pth"
    missing = world["server"].base + "/releases/nope.pth"
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps([
        {"type": "registry_model", "url": dead, "sha256": "1" * 64},
        {"type": "registry_model", "url": missing, "sha256": "2" * 64},
    ]))
    root = tmp_path / "models"
    run = cli("prefetch", "--manifest", manifest, "--models-root", root, "--no-progress", env=world["env"])
    assert run.returncode == 1
    assert f"could not reach {dead}" in run.stderr and str(root / "upscale_models" / "offline.pth") in run.stderr
    assert f"HTTP 404 Not Found for {missing}" in run.stderr
    assert "2 of 2 asset(s) not installed" in run.stderr
    assert not list((root / "upscale_models").iterdir())

    manifest.write_text(json.dumps({"assets": [{"type": "registry_model", "url": missing}]}))
    run = cli("prefetch", "--manifest", manifest, "--models-root", root, env=world["env"])
    assert run.returncode == 1 and "entry 1: 'sha256' must be the file's SHA-256" in run.stderr


def test_python_m_pack_folder_runs_the_same_command(world, tmp_path):
    (tmp_path / "dreamforge_upscale").symlink_to(REPO, target_is_directory=True)
    env = {**os.environ, **world["env"], "PYTHONPATH": str(tmp_path)}
    run = subprocess.run([sys.executable, "-m", "dreamforge_upscale", "assets", "list", "--json", "--models-root",
                          str(world["root"])], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=180)
    assert run.returncode == 0, run.stderr
    names = {m["name"] for m in json.loads(run.stdout)["models"]}
    assert {"tiny_compact.pth", "tiny-x4", "realesr-animevideov3.pth"} <= names
