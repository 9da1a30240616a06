#!/usr/bin/env bash
# Set up a fresh machine and run every check: system packages, a virtual environment with the
# CPU build of PyTorch (installed first so the `train` extra does not pull a CUDA build), the
# project with its `train` and `test` extras, then the layer contracts, lint and the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(fonts-noto-color-emoji openssh-server adb binutils xvfb libegl1 libgl1 libxkbcommon0 libfontconfig1 libdbus-1-3)
if command -v apt-get >/dev/null 2>&1; then
  missing=()
  for p in "${APT_PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if [ ${#missing[@]} -gt 0 ]; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
  fi
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[train,test,package]"

export QT_QPA_PLATFORM=offscreen
.venv/bin/lint-imports
.venv/bin/ruff check .
.venv/bin/python -m pytest "$@"
