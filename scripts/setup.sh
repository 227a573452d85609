#!/usr/bin/env bash
# Create .venv and install moekit with its dev tools, pinned by constraints.txt (a CPU torch).
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev]"
.venv/bin/python -c "import moekit, torch; print(f'moekit {moekit.__version__} ready (torch {torch.__version__})')"
