"""What an asset is (AssetSpec), the built-in catalogue of known models, and manifest files.

Two kinds of asset:
- `registry_model`: one file at a direct URL, pinned by SHA-256 (Real-ESRGAN release files).
- `diffusers_cache` (alias `hf_snapshot`): a Hugging Face repository snapshot at a pinned
  revision, stored as a diffusers folder (the SD x4 upscaler).

A manifest is JSON: {"assets": [entry, ...]} (or a bare list); each entry has the fields of
AssetSpec (see `spec_from_dict`).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..runtime.errors import AssetError

# Model folders, named as in ComfyUI's models/ (LLM: prompt models, as other packs name it).
FOLDERS = ("upscale_models", "checkpoints", "diffusers", "LLM")
FILE_TYPE = "registry_model"
SNAPSHOT_TYPE = "diffusers_cache"
TYPE_ALIASES = {"registry_model": FILE_TYPE, "diffusers_cache": SNAPSHOT_TYPE, "hf_snapshot": SNAPSHOT_TYPE}
DEFAULT_HF_ENDPOINT = "https://huggingface.co"

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


@dataclass(frozen=True)
class AssetSpec:
    name: str  # what the user calls it (catalogue key, manifest "name")
    type: str  # FILE_TYPE | SNAPSHOT_TYPE
    folder: str  # one of FOLDERS
    filename: str  # file name (FILE_TYPE) or folder name (SNAPSHOT_TYPE) inside the model folder
    url: str | None = None
    sha256: str | None = None
    size: int | None = None
    licence: str | None = None
    repo: str | None = None
    revision: str | None = None
    endpoint: str | None = None  # SNAPSHOT_TYPE: the hub; default $HF_ENDPOINT or huggingface.co
    ignore: tuple[str, ...] = field(default=())  # SNAPSHOT_TYPE: fnmatch patterns of repo files to skip

    @property
    def is_file(self) -> bool:
        return self.type == FILE_TYPE

    def hub(self) -> str:
        return (self.endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_HF_ENDPOINT).rstrip("/")

    def source(self) -> str:
        return self.url if self.is_file else f"{self.repo}@{self.revision}"


_RELEASES = "https://github.com/xinntao/Real-ESRGAN/releases/download"
_REAL_ESRGAN_LICENCE = "BSD-3-Clause (Xintao Wang, Real-ESRGAN)"
SD_X4_REPO = "stabilityai/stable-diffusion-x4-upscaler"
# The commit of SD_X4_REPO this release of the pack installs. Left unset until a maintainer checks
# one by hand (this build machine cannot reach the hub); until then `prefetch` asks for
# --revision stabilityai/stable-diffusion-x4-upscaler=<commit> and records the commit it got.
SD_X4_REVISION: str | None = None


def _gan(name: str, tag: str, sha256: str, size: int | None = None) -> AssetSpec:
    filename = name + ".pth"
    return AssetSpec(name=name, type=FILE_TYPE, folder="upscale_models", filename=filename,
                     url=f"{_RELEASES}/{tag}/{filename}", sha256=sha256, size=size, licence=_REAL_ESRGAN_LICENCE)


CATALOG: dict[str, AssetSpec] = {s.name: s for s in (
    _gan("RealESRGAN_x4plus", "v0.1.0", "4fa0d38905f75ac06eb49a7951b426670021be3018265fd191d2125df9d682f1", 67_040_989),
    _gan("RealESRGAN_x2plus", "v0.2.1", "49fafd45f8fd7aa8d31ab2a22d14d91b536c34494a5cfe31eb5d89c2fa266abb"),
    _gan("realesr-general-x4v3", "v0.2.5.0", "8dc7edb9ac80ccdc30c3a5dca6616509367f05fbc184ad95b731f05bece96292"),
    _gan("realesr-animevideov3", "v0.2.5.0", "3a5ca263a93b5c827d6e4a482b8857df6cc8a5c78a9a6065b5e72d4f60b0c7d6"),
    _gan("RealESRGAN_x4plus_anime_6B", "v0.2.2.4", "f872d837d3c90ed2e05227bed711af5671a6fd1c9f7d7e91c911a61f155e99da"),
    AssetSpec(
        name="stable-diffusion-x4-upscaler", type=SNAPSHOT_TYPE, folder="diffusers",
        filename="stable-diffusion-x4-upscaler", repo=SD_X4_REPO, revision=SD_X4_REVISION,
        licence="CreativeML Open RAIL++-M",
        # the diffusers layout only: not the 3.5 GB single-file LDM checkpoint beside it
        ignore=("x4-upscaler-ema.*", "*.ckpt", "*.msgpack", "*.h5", "*.onnx"),
    ),
)}
BUNDLES = {"upscalers": tuple(CATALOG)}


def catalogue_file(folder: str, filename: str) -> AssetSpec | None:
    """The catalogue entry installed as `folder/filename`, if any."""
    for spec in CATALOG.values():
        if spec.folder == folder and spec.filename == filename:
            return spec
    return None


def bundle_specs(bundle: str, only: list[str] | None = None, revisions: dict[str, str] | None = None) -> list[AssetSpec]:
    """The catalogue entries of `bundle` (optionally just `only`), with revision overrides (repo -> rev)."""
    if bundle not in BUNDLES:
        raise AssetError(f"unknown bundle {bundle!r}; choose one of: {', '.join(BUNDLES)}")
    names = list(BUNDLES[bundle])
    if only:
        unknown = [n for n in only if n not in names]
        if unknown:
            raise AssetError(f"--only {', '.join(unknown)}: not in bundle {bundle!r}; its entries are: {', '.join(names)}")
        names = [n for n in names if n in only]
    specs = [with_revision(CATALOG[n], revisions or {}) for n in names]
    for spec in specs:
        try:
            check_spec(spec, f"catalogue entry {spec.name!r}")
        except AssetError as exc:
            others = [n for n in names if n != spec.name]
            raise AssetError(f"{exc}; or leave it out: --only {' '.join(others)}" if others else str(exc)) from None
    return specs


def with_revision(spec: AssetSpec, revisions: dict[str, str]) -> AssetSpec:
    if spec.is_file or spec.repo not in revisions:
        return spec
    return replace(spec, revision=revisions[spec.repo])


def parse_revisions(items: list[str] | None) -> dict[str, str]:
    """--revision REPO=REV (repeatable) -> {repo: rev}."""
    out = {}
    for item in items or []:
        repo, sep, rev = item.partition("=")
        if not sep or not _REPO.match(repo) or not rev.strip():
            raise AssetError(f"--revision {item!r}: expected REPO=REVISION, e.g. {SD_X4_REPO}=<40-hex commit>")
        out[repo] = rev.strip()
    return out


# ------------------------------------------------------------------------------------- validation
def check_spec(spec: AssetSpec, where: str) -> None:
    """Raise AssetError naming `where`, the field and the fix when a spec cannot be installed."""
    if spec.type not in (FILE_TYPE, SNAPSHOT_TYPE):
        raise AssetError(f"{where}: type must be one of {', '.join(TYPE_ALIASES)}; got {spec.type!r}")
    if spec.folder not in FOLDERS:
        raise AssetError(f"{where}: folder must be one of {', '.join(FOLDERS)}; got {spec.folder!r}")
    if spec.is_file:
        if not spec.url or not spec.url.startswith(("http://", "https://")):
            raise AssetError(f"{where}: 'url' must be an http(s) URL of the file; got {spec.url!r}")
        if not spec.sha256 or not _HEX64.match(spec.sha256):
            raise AssetError(f"{where}: 'sha256' must be the file's SHA-256 (64 lowercase hex digits) so the "
                             f"download can be verified; got {spec.sha256!r}")
        if spec.size is not None and (not isinstance(spec.size, int) or spec.size <= 0):
            raise AssetError(f"{where}: 'size' must be a positive number of bytes; got {spec.size!r}")
    else:
        if not spec.repo or not _REPO.match(spec.repo):
            raise AssetError(f"{where}: 'repo' must be a Hugging Face repository id like {SD_X4_REPO}; got {spec.repo!r}")
        if not spec.revision:
            raise AssetError(
                f"{where}: no pinned revision for {spec.repo}. Give the commit to install: "
                f"--revision {spec.repo}=<commit> on the command line, or \"revision\" in a manifest "
                f"(the commit hash from https://huggingface.co/{spec.repo}/commits/main)"
            )
        hub = spec.hub()
        if not hub.startswith(("http://", "https://")):
            raise AssetError(f"{where}: endpoint must be an http(s) URL; got {hub!r} (from the manifest or HF_ENDPOINT)")
    if not _SAFE_NAME.match(spec.filename or "") or ".." in spec.filename:
        raise AssetError(f"{where}: filename {spec.filename!r} must be a plain file name (letters, digits, . _ + -), "
                         "no folders: the folder comes from 'folder'")


def spec_from_dict(entry: dict, where: str) -> AssetSpec:
    if not isinstance(entry, dict):
        raise AssetError(f"{where}: each asset must be a JSON object; got {type(entry).__name__}")
    kind = entry.get("type")
    if kind not in TYPE_ALIASES:
        raise AssetError(f"{where}: 'type' must be one of {', '.join(TYPE_ALIASES)}; got {kind!r}")
    kind = TYPE_ALIASES[kind]
    known = {"type", "name", "folder", "filename", "url", "sha256", "size", "licence", "license", "repo",
             "revision", "endpoint", "ignore"}
    extra = sorted(set(entry) - known)
    if extra:
        raise AssetError(f"{where}: unknown field(s) {', '.join(extra)}; allowed: {', '.join(sorted(known))}")
    if kind == FILE_TYPE:
        url = entry.get("url")
        filename = entry.get("filename") or (url.rsplit("/", 1)[-1].split("?")[0] if isinstance(url, str) else None)
        folder = entry.get("folder", "upscale_models")
    else:
        repo = entry.get("repo")
        filename = entry.get("filename") or (repo.rsplit("/", 1)[-1] if isinstance(repo, str) else None)
        folder = entry.get("folder", "diffusers")
    ignore = entry.get("ignore", ())
    if isinstance(ignore, str) or not all(isinstance(p, str) for p in ignore):
        raise AssetError(f"{where}: 'ignore' must be a list of file patterns like [\"*.ckpt\"]")
    sha = entry.get("sha256")
    spec = AssetSpec(
        name=str(entry.get("name") or filename), type=kind, folder=folder, filename=filename,
        url=entry.get("url"), sha256=sha.lower() if isinstance(sha, str) else sha, size=entry.get("size"),
        licence=entry.get("licence") or entry.get("license"), repo=entry.get("repo"),
        revision=entry.get("revision"), endpoint=entry.get("endpoint"), ignore=tuple(ignore),
    )
    check_spec(spec, where)
    return spec


def load_manifest(path: str | os.PathLike, revisions: dict[str, str] | None = None) -> list[AssetSpec]:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise AssetError(f"manifest {path} does not exist: give the path of a JSON manifest file") from None
    except json.JSONDecodeError as exc:
        raise AssetError(f"manifest {path} is not valid JSON: {exc}") from None
    entries = data.get("assets") if isinstance(data, dict) else data
    if not isinstance(entries, list) or not entries:
        raise AssetError(f"manifest {path}: expected {{\"assets\": [ ... ]}} with at least one entry")
    specs = []
    for i, entry in enumerate(entries, 1):
        name = entry.get("name") if isinstance(entry, dict) else None
        where = f"manifest {path.name}, entry {i}" + (f" ({name})" if name else "")
        if isinstance(entry, dict) and revisions and entry.get("repo") in revisions:
            entry = {**entry, "revision": revisions[entry["repo"]]}
        specs.append(spec_from_dict(entry, where))
    seen: dict[tuple, str] = {}
    for spec in specs:
        key = (spec.folder, spec.filename)
        if key in seen:
            raise AssetError(f"manifest {path.name}: {spec.name!r} and {seen[key]!r} both install {spec.folder}/{spec.filename}")
        seen[key] = spec.name
    return specs
