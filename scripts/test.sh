#!/usr/bin/env bash
# Sets up .venv (torch, the pack's needs, a real ComfyUI 0.3.75) if needed, then runs the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest "$@"
