#!/usr/bin/env bash
# Set up WanStack in ./.venv and Debian's ffmpeg (streaming video). `--dev` adds the test tools and Debian's
# Chromium for the browser tests.
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

# System tools from Debian, as root: ffmpeg + ffprobe for Gradio's streaming video player (it runs both
# from PATH; imageio-ffmpeg ships an ffmpeg for our own encoding but no ffprobe), and with --dev Chromium
# for the browser tests. Without root the app still runs and turns streaming off with a note.
APT=()
command -v ffmpeg >/dev/null && command -v ffprobe >/dev/null || APT+=(ffmpeg)
[ "$DEV" = 1 ] && [ ! -x /usr/bin/chromium ] && APT+=(chromium)
if [ "${#APT[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing Debian's ${APT[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${APT[@]}" >/dev/null
  else
    echo "setup: run 'sudo apt-get install -y ${APT[*]}' (ffmpeg/ffprobe: streaming video in the page; chromium: browser tests)" >&2
  fi
fi
echo "setup: ready"
