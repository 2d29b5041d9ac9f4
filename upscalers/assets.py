"""Models that ship inside the pack."""
from pathlib import Path

BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"
BUNDLED_MODEL = "realesr-animevideov3.pth"  # Real-ESRGAN Compact x4, BSD-3-Clause (see bundled/LICENSE)


def bundled_model_path() -> Path:
    return BUNDLED_DIR / BUNDLED_MODEL
