"""Hashing model files: the one file hasher and a per-version SHA-256 cache."""
from __future__ import annotations

import hashlib
import os
from functools import lru_cache

WEIGHT_EXTENSIONS = (".pth", ".pt", ".ckpt", ".bin", ".safetensors")


def hash_file(path: str | os.PathLike, digest=None):
    """The pack's one file hasher: `digest` (default SHA-256) fed with the file in 1 MiB chunks."""
    digest = digest or hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest


def sha256_of(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a model file, computed once per file version (path, size, mtime)."""
    st = os.stat(path)
    return _sha256_cached(os.path.realpath(path), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=64)
def _sha256_cached(path: str, _size: int, _mtime_ns: int) -> str:  # size/mtime make edits re-hash
    return hash_file(path).hexdigest()
