"""Make the pack's backends importable as `dreamforge_upscale.<subpackage>` without ComfyUI.

The repo root's __init__.py registers the ComfyUI nodes (and so imports comfy); the backends must
not need it. A namespace package whose entries link to the real subpackages gives tests and tools
the same relative-import layout ComfyUI sees, minus the root __init__.
"""
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BACKENDS = ("tiling", "upscalers", "zoom")


def install(name: str = "dreamforge_upscale") -> Path:
    root = Path(tempfile.mkdtemp(prefix="df-pkg-"))
    pkg = root / name
    pkg.mkdir()
    for sub in BACKENDS:
        os.symlink(REPO / sub, pkg / sub)
    sys.path.insert(0, str(root))
    return root
