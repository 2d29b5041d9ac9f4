"""Provenance sidecars: `<file or folder>.dreamforge.json` next to every model the pack installed.

A sidecar says where the model came from (URL, or repository + commit), its SHA-256 and size, and
when it was installed. `assets list` shows it, `assets verify` checks the file against it, and the
upscale receipts quote it.
"""
from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

from ..runtime.errors import AssetError

SUFFIX = ".dreamforge.json"
FORMAT = 1

def sidecar_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(path.name + SUFFIX)


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def write_sidecar(path: str | os.PathLike, record: dict) -> Path:
    """Write the sidecar of `path` atomically; `record` needs at least source and sha256."""
    side = sidecar_path(path)
    body = {"dreamforge_provenance": FORMAT, "file": Path(path).name, **record}
    body.setdefault("date", utc_now())
    tmp = side.with_name(f"{side.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")  # unique: writers never collide
    try:
        tmp.write_text(json.dumps(body, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, side)
    finally:
        tmp.unlink(missing_ok=True)
    return side


def read_sidecar(path: str | os.PathLike) -> dict | None:
    """The sidecar of `path`, None when there is none; AssetError when it is unreadable."""
    side = sidecar_path(path)
    try:
        text = side.read_text()
    except FileNotFoundError:
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise AssetError(
            f"{side}: provenance sidecar is not valid JSON ({exc}); delete it and re-run "
            "`assets prefetch` (or `assets verify`) to re-create it"
        ) from None
    if not isinstance(record, dict) or "sha256" not in record:
        raise AssetError(f"{side}: not a DreamForge provenance sidecar (no sha256); delete it")
    return record


def receipt_provenance(path: str | os.PathLike, sha256: str | None) -> dict | None:
    """The small provenance entry a receipt quotes (None without a sidecar)."""
    try:
        record = read_sidecar(path)
    except AssetError as exc:  # an upscale must not fail over a damaged sidecar, but the receipt says so
        return {"error": str(exc)}
    if record is None:
        return None
    return {
        "source": record.get("source"),
        "installed": record.get("date"),
        "matches_sidecar": (record.get("sha256") == sha256) if sha256 else None,
    }
