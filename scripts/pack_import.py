"""Make the pack's backends importable as `dreamforge_upscale.<subpackage>` without ComfyUI.

The repo root's __init__.py registers the ComfyUI nodes (and so imports comfy); the backends must
not need it, and the pack's folder name (git clone, registry install) need not be a valid module
name. A namespace package whose entries link to the real subpackages gives tests and tools the
same relative-import layout ComfyUI sees, minus the root __init__. Used by tests/conftest.py
(through tests/pack_import.py) and scripts/dreamforge_assets.py.
"""
import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BACKENDS = ("runtime", "assets", "tiling", "imaging", "upscalers", "zoom", "cli", "api.py")  # cli/ + api.py: the library and command line


def install(name: str = "dreamforge_upscale") -> Path:
    root = Path(tempfile.mkdtemp(prefix="df-pkg-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)  # only symlinks inside: the repo is untouched
    pkg = root / name
    pkg.mkdir()
    for sub in BACKENDS:
        os.symlink(REPO / sub, pkg / sub)
    sys.path.insert(0, str(root))
    return root
