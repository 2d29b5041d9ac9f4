"""`assets verify`: the SHA-256 of every installed file against its reference, and an offline load check.

References, most specific first: the entry of the manifest/bundle being verified, the file's
provenance sidecar, the bundled model's known hash, the catalogue entry of the same file name.
Load checks never touch the network: the caller's GAN loader (`load_gan`: spandrel) for upscale models; for diffusers
folders model_index.json plus a local-files-only config load of each component and a read of each
weights file's header (no full weight load); a header/weights-only read for other files.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..runtime.errors import AssetError, UpscalerError, error_text
from .bundled_model import BUNDLED_DIR
from .catalog import AssetSpec, catalogue_file
from .discovery import Installed, Locations, list_installed, reference_sha256
from .download import tree_sha256
from .hashing import sha256_of

PASSING = ("ok", "unpinned")  # unpinned: no reference hash known, but it loads


@dataclass
class Check:
    name: str
    folder: str
    path: Path | None
    status: str  # ok | unpinned | mismatch | missing | load-failed
    detail: str = ""
    expected: str | None = None
    actual: str | None = None

    @property
    def passed(self) -> bool:
        return self.status in PASSING

    def as_json(self) -> dict:
        return {"name": self.name, "folder": self.folder, "path": str(self.path) if self.path else None,
                "status": self.status, "detail": self.detail, "expected_sha256": self.expected,
                "actual_sha256": self.actual}


# ------------------------------------------------------------------------------------- load checks
def _weights_header(path: Path) -> int:
    """Number of tensors in a weights file, read without loading them (safetensors header) or weights-only."""
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as fh:
            n = len(list(fh.keys()))
    else:
        import torch

        sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        n = len(sd) if isinstance(sd, dict) else 0
    if n == 0:
        raise AssetError(f"{path.name} holds no tensors")
    return n


def _weights_in(folder: Path) -> None:
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not files:
        raise AssetError(f"{folder.name}/ has no weights file (*.safetensors or *.bin)")
    for index in folder.glob("*.index.json"):
        shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        missing = sorted(s for s in shards if not (folder / s).is_file())
        if missing:
            raise AssetError(f"{folder.name}/{index.name} names missing shards: {', '.join(missing)}")
    for f in files:
        _weights_header(f)


def check_diffusers_folder(path: Path) -> list[str]:
    """Problems of a diffusers folder, offline: model_index.json, then each component's config and weights."""
    try:
        index = json.loads((path / "model_index.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return [f"model_index.json unreadable: {exc}"]
    if not isinstance(index, dict) or "_class_name" not in index:
        return ["model_index.json has no _class_name: not a diffusers pipeline folder"]
    components = {k: v for k, v in index.items()
                  if not k.startswith("_") and isinstance(v, list) and len(v) == 2}
    if not components:
        return ["model_index.json lists no components"]
    problems = []
    for name, (library, cls) in sorted(components.items()):
        if library is None or cls is None:
            continue  # an optional component the pipeline does without (e.g. safety_checker)
        sub = path / name
        if not sub.is_dir():
            problems.append(f"{name}: listed in model_index.json but the folder {name}/ is missing")
            continue
        try:
            if library == "diffusers":
                import diffusers

                klass = getattr(diffusers, cls, None)
                if klass is None:
                    raise AssetError(f"diffusers has no class {cls}")
                klass.load_config(str(sub), local_files_only=True)
                if issubclass(klass, diffusers.ModelMixin):
                    _weights_in(sub)
            elif library == "transformers":
                import transformers

                klass = getattr(transformers, cls, None)
                if klass is None:
                    raise AssetError(f"transformers has no class {cls}")
                if "Tokenizer" in cls:
                    klass.from_pretrained(str(sub), local_files_only=True)
                else:
                    transformers.AutoConfig.from_pretrained(str(sub), local_files_only=True)
                    if issubclass(klass, transformers.PreTrainedModel):
                        _weights_in(sub)
            # other libraries: present, not load-checked
        except Exception as exc:  # noqa: BLE001 - every failure of a component is reported, by name
            problems.append(f"{name} ({library}.{cls}): {error_text(exc, 300)}")
    return problems


def load_check(kind: str, path: Path, load_gan: Callable[[Path], object]) -> str | None:
    """None when the model loads offline, else what is wrong. `load_gan` loads an upscale_models file (it
    raises when it cannot): the loader lives with the backends, above this package."""
    try:
        if kind == "diffusers":
            problems = check_diffusers_folder(path)
            return "; ".join(problems) or None
        if kind == "upscale_models":
            load_gan(path)
            return None
        if path.is_dir():  # an LLM folder (transformers layout)
            import transformers

            transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
            for f in sorted(path.glob("*.safetensors")):
                _weights_header(f)
            return None
        _weights_header(path)
        return None
    except UpscalerError as exc:
        return str(exc)
    except Exception as exc:  # noqa: BLE001 - a load check reports every failure, it does not raise
        return error_text(exc, 300)


# ------------------------------------------------------------------------------------- hash checks
def _hash_check(item: Installed, expected: str | None, spec: AssetSpec | None) -> Check:
    base = dict(name=item.name, folder=item.folder, path=item.path)
    if item.is_dir:
        record = item.sidecar
        if not record or not isinstance(record.get("files"), dict):
            return Check(**base, status="unpinned", detail="no sidecar with file hashes")
        bad = []
        for rel, want in sorted(record["files"].items()):
            f = item.path / rel
            if not f.is_file():
                bad.append(f"{rel}: missing")
            else:
                got = sha256_of(f)
                if got != want:
                    bad.append(f"{rel}: SHA-256 {got}, expected {want}")
        if spec is not None and spec.revision and record.get("commit") and len(spec.revision) == 40 \
                and record["commit"] != spec.revision:
            bad.append(f"installed commit {record['commit']}, the manifest pins {spec.revision}")
        if bad:
            return Check(**base, status="mismatch", detail="; ".join(bad),
                         expected=record.get("sha256"), actual=tree_sha256({k: sha256_of(item.path / k)
                                                                           for k in record["files"]
                                                                           if (item.path / k).is_file()}))
        return Check(**base, status="ok", expected=record.get("sha256"), actual=record.get("sha256"))
    actual = sha256_of(item.path)
    if expected is None:
        return Check(**base, status="unpinned", detail="no reference hash (placed by hand)", actual=actual)
    if actual != expected:
        return Check(**base, status="mismatch", expected=expected, actual=actual,
                     detail=f"SHA-256 {actual}, expected {expected}: the file is damaged or was replaced; "
                            "re-run `assets prefetch` after moving it away")
    return Check(**base, status="ok", expected=expected, actual=actual)


def _installed_for(spec: AssetSpec, locations: Locations) -> Installed | None:
    for item in list_installed(locations, (spec.folder,)):
        if item.name == spec.filename and item.path.parent.resolve() != BUNDLED_DIR:
            return item
    return None


def verify(locations: Locations, specs: list[AssetSpec] | None = None,
           load_gan: Callable[[Path], object] | None = None) -> list[Check]:
    """Check `specs` (each must be installed), or else everything installed; with `load_gan` (see load_check)
    each also loads offline."""
    checks = []
    if specs is not None:
        pairs = []
        for spec in specs:
            item = _installed_for(spec, locations)
            if item is None:
                where = locations.install_dir(spec.folder) / spec.filename
                checks.append(Check(spec.name, spec.folder, where, "missing",
                                    f"not installed: run `assets prefetch` (expected at {where})"))
            else:
                pairs.append((item, spec.sha256 if spec.is_file else None, spec))
    else:
        pairs = []
        for item in list_installed(locations):
            try:
                expected = None if item.is_dir else reference_sha256(item.path, item.folder, "installed")
                if expected is None and not item.is_dir:
                    cat = catalogue_file(item.folder, item.path.name)
                    expected = cat.sha256 if cat else None
            except AssetError as exc:  # an unreadable sidecar
                checks.append(Check(item.name, item.folder, item.path, "mismatch", str(exc)))
                continue
            pairs.append((item, expected, None))
    for item, expected, spec in pairs:
        check = _hash_check(item, expected, spec)
        if load_gan is not None and check.status in PASSING:
            problem = load_check(item.folder, item.path, load_gan)
            if problem:
                check = Check(check.name, check.folder, check.path, "load-failed", problem, check.expected, check.actual)
        checks.append(check)
    return checks


__all__ = ["Check", "PASSING", "check_diffusers_folder", "load_check", "verify"]
