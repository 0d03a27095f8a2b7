#!/usr/bin/env bash
# Set up WanStack in ./.venv. `--dev` adds the test tools and Debian's Chromium for the browser tests.
# torch is installed first at the pinned version: a looser requirement pulled in by another package
# would otherwise fetch the newest CUDA build (gigabytes) on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_PIN=$(grep -E '^torch==' requirements.txt)
DEV=0
[ "${1:-}" = "--dev" ] && DEV=1

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --disable-pip-version-check -q)

if ! .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '${TORCH_PIN#torch==}' else 1)" 2>/dev/null; then
  echo "setup: installing $TORCH_PIN"
  "${PIP[@]}" "$TORCH_PIN"
fi
if [ "$DEV" = 1 ]; then
  "${PIP[@]}" -r requirements-dev.txt
else
  "${PIP[@]}" -r requirements.txt
fi

if [ "$DEV" = 1 ] && [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing Debian's chromium for the browser tests"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "setup: the browser tests need /usr/bin/chromium: run 'sudo apt-get install -y chromium'" >&2
  fi
fi
echo "setup: ready"
