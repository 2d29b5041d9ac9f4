"""Where models are, in the order the design asks, and installing the missing ones.

Precedence, for a model asked for by name or by catalogue/manifest entry:
1. explicit local mirror: `--mirror DIR` / `DF_LOCAL_MIRROR`, a folder holding the files by name
   (flat, or in `<folder>/` subfolders); read, never written;
2. installed file in a model folder: inside ComfyUI the folder lists ComfyUI gives the bridge
   (models/<folder>, extra_model_paths.yaml entries, the pack's bundled model, the models root);
   outside ComfyUI the models root: `--models-root DIR` / `DF_MODELS_ROOT` / the user cache
   directory (~/.cache/dreamforge-upscale/models), laid out as upscale_models/, checkpoints/,
   diffusers/, LLM/;
3. runtime cache: where other tools already put these files: torch hub's checkpoints folder
   ($TORCH_HOME/hub/checkpoints, where Real-ESRGAN's own scripts download) for single files, and
   the Hugging Face hub cache ($HF_HUB_CACHE) for repository snapshots;
4. remote fetch: only when the caller allows it (`assets prefetch`); loaders never download.

Files found in a mirror or cache are checked against the catalogue's SHA-256; files this pack
installed are checked against their provenance sidecar. No ComfyUI import here: the bridge passes
its folder lists in as a callback (`Locations.folders`).
"""
from __future__ import annotations

import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..runtime.errors import AssetError
from .bundled_model import BUNDLED_DIR, BUNDLED_SHA256, bundled_model_path
from .catalog import FOLDERS, AssetSpec, catalogue_file
from .download import copy_verified, fetch_snapshot, fetch_url, tree_sha256
from .file_lock import install_lock
from .hashing import WEIGHT_EXTENSIONS, sha256_of
from .provenance import read_sidecar, sidecar_path, utc_now, write_sidecar

ENV_MODELS_ROOT = "DF_MODELS_ROOT"
ENV_MIRROR = "DF_LOCAL_MIRROR"
ORIGINS = ("mirror", "installed", "cache", "download")
_HEX40 = re.compile(r"^[0-9a-f]{40}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


# ------------------------------------------------------------------------------------- places
def user_cache_dir() -> Path:
    if os.name == "nt":
        return Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")


def default_models_root() -> Path:
    return user_cache_dir() / "dreamforge-upscale" / "models"


def models_root(explicit: str | os.PathLike | None = None) -> Path:
    """--models-root, else $DF_MODELS_ROOT, else <user cache>/dreamforge-upscale/models."""
    value = explicit or os.environ.get(ENV_MODELS_ROOT) or default_models_root()
    return Path(value).expanduser().resolve()


def mirror_dir(explicit: str | os.PathLike | None = None) -> Path | None:
    """--mirror, else $DF_LOCAL_MIRROR, else None. A mirror that is not a folder is an error."""
    value = explicit or os.environ.get(ENV_MIRROR)
    if not value:
        return None
    path = Path(value).expanduser().resolve()
    if not path.is_dir():
        source = "--mirror" if explicit else ENV_MIRROR
        raise AssetError(f"local mirror {path} (from {source}) is not a folder: create it, fix the path or unset {source}")
    return path


def torch_hub_checkpoints() -> Path:
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


def hf_hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface" / "hub"


@dataclass
class Locations:
    """Where to look. `folders(kind)` lists the model folders of a kind, the first being where
    `install` puts new files (the bridge passes ComfyUI's lists; `standalone` uses a models root)."""

    folders: Callable[[str], list[Path]]
    mirror: Path | None = None
    use_cache: bool = True

    @classmethod
    def standalone(cls, root: str | os.PathLike | None = None, mirror: str | os.PathLike | None = None,
                   use_cache: bool = True) -> "Locations":
        base = models_root(root)

        def folders(kind: str) -> list[Path]:
            return [base / kind] + ([BUNDLED_DIR] if kind == "upscale_models" else [])

        return cls(folders, mirror_dir(mirror), use_cache)

    def install_dir(self, kind: str) -> Path:
        dirs = self.folders(kind)
        if not dirs:
            raise AssetError(f"no model folder is configured for {kind!r}")
        return Path(dirs[0])


@dataclass
class Resolved:
    path: Path
    origin: str  # one of ORIGINS ("installed" also for a model that was already there)
    note: str = ""


# ------------------------------------------------------------------------------------- lookups
def _is_snapshot_dir(path: Path) -> bool:
    return path.is_dir() and (path / "model_index.json").is_file()


def _mirror_candidates(mirror: Path, kind: str, name: str) -> list[Path]:
    return [mirror / name, mirror / kind / name]


def _hf_cache_snapshot(repo: str, revision: str | None) -> Path | None:
    if not revision:
        return None
    root = hf_hub_cache() / ("models--" + repo.replace("/", "--"))
    commit = revision
    if not _HEX40.match(revision):
        ref = root / "refs" / revision
        if not ref.is_file():
            return None
        commit = ref.read_text().strip()
    snap = root / "snapshots" / commit
    return snap if _is_snapshot_dir(snap) else None


def _check_file(path: Path, expected: str | None, what: str, fix: str) -> None:
    if expected is None:
        return
    actual = sha256_of(path)
    if actual != expected:
        raise AssetError(f"{what} {path} has SHA-256 {actual}, expected {expected}: {fix}")


def reference_sha256(path: Path, kind: str, origin: str) -> str | None:
    """The hash a found file must have: its sidecar's, the bundled model's, or (mirror/cache) the catalogue's."""
    record = read_sidecar(path)
    if record is not None:
        return record["sha256"]
    if path.resolve() == bundled_model_path():
        return BUNDLED_SHA256
    if origin in ("mirror", "cache"):
        spec = catalogue_file(kind, path.name)
        return spec.sha256 if spec else None
    return None


def locate(name: str, kind: str, locations: Locations) -> Resolved:
    """A model file by name (a loader's combo value): mirror -> model folders -> runtime cache.

    Never downloads. A file whose hash differs from its reference (sidecar / catalogue) is an error.
    """
    if not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise AssetError(f"{kind} model name {name!r} must be a name inside a model folder (no absolute path, no '..')")
    candidates: list[tuple[Path, str]] = []
    if locations.mirror:
        candidates += [(p, "mirror") for p in _mirror_candidates(locations.mirror, kind, name)]
    candidates += [(Path(d) / name, "installed") for d in locations.folders(kind)]
    if locations.use_cache and catalogue_file(kind, Path(name).name):
        candidates.append((torch_hub_checkpoints() / name, "cache"))
    for path, origin in candidates:
        if path.is_file():
            _check_file(path, reference_sha256(path, kind, origin), f"{kind} model",
                        "the file is damaged or not the one recorded; replace it (assets prefetch) or remove it")
            return Resolved(path, origin)
    searched = ", ".join(str(p.parent) for p, _ in candidates)
    raise AssetError(
        f"{kind} model {name!r} not found (searched: {searched}). Put the file in one of those folders, or "
        "fetch a known model with `python scripts/dreamforge_assets.py prefetch --bundle upscalers`."
    )


def model_names(kind: str, locations: Locations, listed: list[str]) -> list[str]:
    """A loader's choices: `listed` (the model folders, as ComfyUI lists them) plus the mirror's
    files and the catalogue files found in the runtime cache."""
    names = set(listed)
    extra_dirs = []
    if locations.mirror:
        extra_dirs += _mirror_candidates(locations.mirror, kind, "")
    for d in extra_dirs:
        if d.is_dir():
            names.update(p.name for p in d.iterdir() if p.is_file() and p.suffix.lower() in WEIGHT_EXTENSIONS)
    if locations.use_cache:
        cache = torch_hub_checkpoints()
        if cache.is_dir():
            names.update(p.name for p in cache.iterdir() if p.is_file() and catalogue_file(kind, p.name))
    return sorted(names)


def _find(spec: AssetSpec, locations: Locations) -> list[tuple[Path, str]]:
    """Existing candidates for a catalogue/manifest entry, in precedence order."""
    found: list[tuple[Path, str]] = []
    ok = Path.is_file if spec.is_file else _is_snapshot_dir
    if locations.mirror:
        found += [(p, "mirror") for p in _mirror_candidates(locations.mirror, spec.folder, spec.filename) if ok(p)]
    found += [(Path(d) / spec.filename, "installed") for d in locations.folders(spec.folder)
              if ok(Path(d) / spec.filename) and Path(d).resolve() != BUNDLED_DIR]
    if locations.use_cache:
        if spec.is_file:
            p = torch_hub_checkpoints() / spec.filename
            if p.is_file():
                found.append((p, "cache"))
        else:
            snap = _hf_cache_snapshot(spec.repo, spec.revision)
            if snap:
                found.append((snap, "cache"))
    return found


def _check_candidate(spec: AssetSpec, path: Path, origin: str) -> None:
    if spec.is_file:
        fix = {"mirror": "replace the mirror's copy or remove it from the mirror",
               "installed": "it is not the file this entry pins: move it away (or delete it) and run prefetch again",
               "cache": "delete the cached copy"}[origin]
        _check_file(path, spec.sha256, f"{spec.name}: {origin} file", fix)
    elif origin == "installed":
        record = read_sidecar(path)
        commit = record.get("commit") if record else None
        if commit and _HEX40.match(spec.revision or "") and commit != spec.revision:
            raise AssetError(f"{spec.name}: {path} holds {spec.repo} commit {commit}, but revision {spec.revision} "
                             "is asked for: move it away (or delete it) and run prefetch again")


def resolve(spec: AssetSpec, locations: Locations, allow_download: bool = False, **fetch_kw) -> Resolved:
    """Where `spec` is, by precedence; remote fetch (into the first model folder) only if allowed."""
    for path, origin in _find(spec, locations):
        _check_candidate(spec, path, origin)
        return Resolved(path, origin)
    target = locations.install_dir(spec.folder) / spec.filename
    if not allow_download:
        raise AssetError(
            f"{spec.name} is not installed (looked in the mirror, {target.parent} and the runtime cache) and remote "
            f"fetch is off. Run `python scripts/dreamforge_assets.py prefetch` for it, or put it at {target} by hand "
            f"({'SHA-256 ' + spec.sha256 if spec.is_file else spec.repo + '@' + str(spec.revision)})."
        )
    return install(spec, locations, **fetch_kw)


# ------------------------------------------------------------------------------------- install
def _record(spec: AssetSpec, sha256: str, size: int, via: str, **extra) -> dict:
    rec = {"name": spec.name, "type": spec.type, "folder": spec.folder, "sha256": sha256, "size": size,
           "via": via, "date": utc_now()}
    if spec.licence:
        rec["licence"] = spec.licence
    if spec.is_file:
        rec.update(source=spec.url, url=spec.url)
    else:
        rec.update(repo=spec.repo, revision=spec.revision)
    rec.update(extra)
    if not spec.is_file:
        rec["source"] = f"{spec.repo}@{rec.get('commit') or spec.revision}"
    return rec


def _copy_snapshot(src: Path, dest: Path) -> dict[str, str]:
    """Copy a snapshot folder (following the hub cache's symlinks) via DEST.part; per-file sha256.

    Files the hub cache keeps as blobs named by their SHA-256 (LFS) are checked against that name.
    """
    stage = dest.with_name(dest.name + ".part")
    shutil.rmtree(stage, ignore_errors=True)
    shutil.copytree(src, stage, symlinks=False)
    files = {}
    for p in sorted(stage.rglob("*")):
        if p.is_file():
            rel = p.relative_to(stage).as_posix()
            files[rel] = sha256_of(p)
            origin = src / rel
            blob = Path(os.path.realpath(origin)).name
            if origin.is_symlink() and _HEX64.match(blob) and blob != files[rel]:
                shutil.rmtree(stage)
                raise AssetError(f"{origin}: cached file is damaged (SHA-256 {files[rel]}, the cache names it {blob}); "
                                 "delete that snapshot from the Hugging Face cache")
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(stage, dest)
    return files


def install(spec: AssetSpec, locations: Locations, *, progress: bool = True, timeout: float = 30.0,
            retries: int = 3) -> Resolved:
    """Make `spec` installed in its model folder: already there -> mirror -> cache -> remote fetch.

    Writes the provenance sidecar. Returns where it is and where it came from.
    """
    target = locations.install_dir(spec.folder) / spec.filename
    with install_lock(target):  # a concurrent install of the same target waits, then finds it installed
        return _install(spec, target, locations, progress=progress, timeout=timeout, retries=retries)


def _install(spec: AssetSpec, target: Path, locations: Locations, *, progress: bool, timeout: float,
             retries: int) -> Resolved:
    present = target.is_file() if spec.is_file else _is_snapshot_dir(target)
    if present:
        _check_candidate(spec, target, "installed")
        if spec.is_file and read_sidecar(target) is None:  # placed by hand: record what we verified
            write_sidecar(target, _record(spec, spec.sha256, target.stat().st_size, "found installed"))
        return Resolved(target, "installed", "already installed")
    for path, origin in _find(spec, locations):
        if origin == "installed":
            continue  # in another model folder: install a copy where this entry belongs
        if spec.is_file:
            sha, size = copy_verified(path, target, spec.sha256, spec.name)
            write_sidecar(target, _record(spec, sha, size, f"{origin}:{path}"))
        else:
            files = _copy_snapshot(path, target)
            commit = path.name if origin == "cache" and _HEX40.match(path.name) else None
            write_sidecar(target, _record(spec, tree_sha256(files), _tree_size(target), f"{origin}:{path}",
                                          files=files, **({"commit": commit} if commit else {})))
        return Resolved(target, origin, f"copied from {path}")
    if spec.is_file:
        mirror_hint = f" or into a local mirror folder ({ENV_MIRROR}) as {spec.filename}"
        got = fetch_url(spec.url, target, sha256=spec.sha256, size=spec.size, label=spec.filename,
                        progress=progress, timeout=timeout, retries=retries,
                        hand_place=f"put it at {target} (SHA-256 {spec.sha256}){mirror_hint}")
        write_sidecar(target, _record(spec, got.sha256, got.size, "download"))
    else:
        snap = fetch_snapshot(spec.repo, spec.revision, target, hub=spec.hub(), ignore=spec.ignore,
                              progress=progress, timeout=timeout, retries=retries)
        write_sidecar(target, _record(spec, tree_sha256(snap.files), snap.size, "download", commit=snap.commit,
                                      endpoint=spec.hub(), files=snap.files))
        return Resolved(target, "download", f"downloaded from {spec.repo}@{snap.commit}")
    return Resolved(target, "download", f"downloaded from {spec.url}")


def _tree_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ------------------------------------------------------------------------------------- listing
@dataclass
class Installed:
    name: str  # relative to its model folder
    folder: str  # kind
    path: Path
    is_dir: bool
    size: int
    sha256: str | None  # from the sidecar, else computed for files; None for folders without one
    source: str  # sidecar source, "bundled", or "-" (placed by hand)
    sidecar: dict | None

    def as_json(self) -> dict:
        return {"name": self.name, "folder": self.folder, "path": str(self.path),
                "type": "folder" if self.is_dir else "file", "size": self.size, "sha256": self.sha256,
                "source": self.source, "provenance": self.sidecar}


def _entries(kind: str, folder: Path) -> list[tuple[str, Path]]:
    if not folder.is_dir():
        return []
    out = []
    if kind == "diffusers":
        for mi in sorted(folder.rglob("model_index.json")):
            d = mi.parent
            if d != folder and not any(part.endswith((".part", ".old")) for part in d.relative_to(folder).parts):
                out.append((d.relative_to(folder).as_posix(), d))
        return out
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if any(part.endswith((".part", ".old")) for part in rel.parts[:-1]):
            continue
        if p.is_file() and p.suffix.lower() in WEIGHT_EXTENSIONS:
            if kind == "LLM" and len(rel.parts) > 1 and (folder / rel.parts[0] / "config.json").is_file():
                continue  # a file inside an LLM folder: the folder is the model
            out.append((rel.as_posix(), p))
        elif kind == "LLM" and p.is_dir() and len(rel.parts) == 1 and (p / "config.json").is_file():
            out.append((rel.as_posix(), p))
    return out


def list_installed(locations: Locations, kinds: tuple[str, ...] = FOLDERS) -> list[Installed]:
    items = []
    for kind in kinds:
        seen_dirs = set()
        for folder in locations.folders(kind):
            folder = Path(folder)
            if folder.resolve() in seen_dirs:
                continue
            seen_dirs.add(folder.resolve())
            bundled = folder.resolve() == BUNDLED_DIR
            for name, path in _entries(kind, folder):
                record = read_sidecar(path)
                is_dir = path.is_dir()
                size = _tree_size(path) if is_dir else path.stat().st_size
                sha = record["sha256"] if record else (None if is_dir else sha256_of(path))
                source = record.get("source", "-") if record else ("bundled" if bundled else "-")
                items.append(Installed(name, kind, path, is_dir, size, sha, source or "-", record))
    return items


__all__ = [
    "ENV_MIRROR", "ENV_MODELS_ROOT", "Installed", "Locations", "Resolved", "default_models_root", "hf_hub_cache",
    "install", "list_installed", "locate", "mirror_dir", "model_names", "models_root", "reference_sha256", "resolve",
    "sidecar_path", "torch_hub_checkpoints",
]
