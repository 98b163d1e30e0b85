#!/usr/bin/env bash
# Install the app into .venv (idempotent) and launch it. Arguments go to app.py, e.g. --profile laion.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
exec .venv/bin/python app.py "$@"
