#!/usr/bin/env bash
# Sets up .venv (torch, the pack's needs, a real ComfyUI 0.3.75) and the browser test's Chromium if
# needed, then runs the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_browser.sh  # the browser test's Chromium (a test dependency; no-op when installed)
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest "$@"
