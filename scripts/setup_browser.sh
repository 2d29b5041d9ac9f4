#!/usr/bin/env bash
# Installs Debian's Chromium for the browser test (tests/test_browser_ui.py), which drives it with
# Playwright for Python (executable_path=/usr/bin/chromium; Playwright's own browser download is not
# used). Idempotent: does nothing when /usr/bin/chromium exists. Needs root (CI runs as root) or
# passwordless sudo.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
    echo "setup_browser.sh: not root and no sudo: install Debian's chromium by hand (apt-get install chromium);" \
         "the browser test skips without it" >&2
    exit 0
  fi
fi
export DEBIAN_FRONTEND=noninteractive
echo "installing Debian's chromium for the browser test..." >&2
# A failure here does not stop the rest of the set-up: the browser test then fails (under CI) or skips
# with the reason, and every other test still runs.
if $SUDO apt-get update -q >/dev/null && \
   $SUDO apt-get install -y -q --no-install-recommends chromium fonts-dejavu-core >/dev/null; then
  /usr/bin/chromium --version >&2 || true
else
  echo "setup_browser.sh: apt-get could not install chromium" >&2
fi
