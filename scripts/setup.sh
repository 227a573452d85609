#!/usr/bin/env bash
# Create .venv and install moekit with its dev tools, pinned by constraints.txt (a CPU torch).
# Idempotent: a second run only checks that everything is installed.
#   --with-browser  also install Debian's chromium and chromium-driver (apt, needs root) for the browser tests
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ "${1:-}" = "--with-browser" ] && ! { command -v chromium && command -v chromedriver; } >/dev/null; then
  if [ "$(id -u)" != 0 ]; then
    echo "setup.sh --with-browser installs chromium with apt-get and must run as root" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq chromium chromium-driver >/dev/null
fi
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev]"
.venv/bin/python -c "import moekit, torch; print(f'moekit {moekit.__version__} ready (torch {torch.__version__})')"
