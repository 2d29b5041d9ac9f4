"""Models that ship inside the pack."""
from pathlib import Path

BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"
BUNDLED_MODEL = "realesr-animevideov3.pth"  # Real-ESRGAN Compact x4, BSD-3-Clause (see bundled/LICENSE)
# Its bytes differ from the upstream release file (same weights, re-serialised; see bundled/LICENSE).
BUNDLED_SHA256 = "9917685390d063042c684b3ad10c477c2af91a4b8f2612517075a1c973a2019f"


def bundled_model_path() -> Path:
    return BUNDLED_DIR / BUNDLED_MODEL
