#!/usr/bin/env bash
# Install what the browser tests (tests/browser) need; idempotent, safe to run again.
#   - Debian's Chromium, with apt, when no chromium is on PATH (needs root; `playwright install` cannot download
#     browsers here and is not used: Playwright drives this Chromium through executable_path), and a colour emoji
#     font, without which the page's emoji (status marks) show as empty boxes in screenshots.
#   - the `playwright` Python package into .venv, at the version pinned in requirements-dev.txt.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v chromium >/dev/null || missing+=(chromium)
dpkg -s fonts-noto-color-emoji >/dev/null 2>&1 || missing+=(fonts-noto-color-emoji)
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "install_browser.sh: missing ${missing[*]}; run as root or: sudo apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null
fi
chromium --version 2>/dev/null || true

PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pin="$(grep -E '^playwright==' requirements-dev.txt)"
.venv/bin/python -m pip install -q --disable-pip-version-check "$pin"
.venv/bin/python -c "import playwright.sync_api, importlib.metadata as m; print('playwright', m.version('playwright'))"
