"""Test set-up: the pack importable as `dreamforge_upscale` without ComfyUI, the helpers in tests/ and scripts/
importable; the fixtures live one module per job (receipt_fixtures.py, comfy_fixtures.py)."""
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS.parent / "scripts"))  # comfy_headless, comfy_browser
sys.path.insert(0, str(TESTS))
import pack_import  # noqa: E402

pack_import.install()

pytest_plugins = ("receipt_fixtures", "comfy_fixtures")
