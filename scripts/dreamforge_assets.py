"""Model assets from the command line, whatever the pack's folder is called.

    python scripts/dreamforge_assets.py prefetch --bundle upscalers [--models-root DIR]
    python scripts/dreamforge_assets.py prefetch --manifest FILE.json [--models-root DIR]
    python scripts/dreamforge_assets.py verify [--manifest FILE.json] [--models-root DIR]
    python scripts/dreamforge_assets.py list [--json] [--models-root DIR]

Same as `python -m <pack folder> assets ...` (see cli/assets_cmd.py), which needs the pack's
folder name to be an importable module name.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pack_import  # noqa: E402

pack_import.install()
from dreamforge_upscale.cli.assets_cmd import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(prog="dreamforge_assets.py"))
