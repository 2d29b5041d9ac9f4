#!/usr/bin/env bash
# The main job end to end: sets up .venv if needed, starts a headless real ComfyUI with this pack,
# upscales a real photo with the bundled model and prints where the image and receipt are.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python scripts/demo_upscale.py "$@"
