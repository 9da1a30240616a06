#!/usr/bin/env bash
# Set up a fresh machine and run every check: system packages, a virtual environment with the
# CPU build of PyTorch (installed first so the `train` extra does not pull a CUDA build), the
# project with its `train` and `test` extras, then the layer contracts, lint and the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(python3-venv fonts-noto-color-emoji openssh-server adb binutils xvfb libegl1 libgl1 libxkbcommon0 libfontconfig1 libdbus-1-3)
if command -v apt-get >/dev/null 2>&1; then
  missing=()
  for p in "${APT_PACKAGES[@]}"; do
    # "install ok installed" only: a package removed but not purged still answers dpkg -s
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
    # The SSH tests start their own sshd on a free port; the system's, which the package enables
    # on port 22, is not needed (nor wanted on a developer's machine).
    if [[ " ${missing[*]} " == *" openssh-server "* ]] && command -v systemctl >/dev/null 2>&1; then
      $SUDO systemctl disable --now ssh >/dev/null 2>&1 || true
    fi
  fi
fi

PY=${PYTHON:-python3}
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null || {
  echo "test.sh: needs Python 3.10 or newer as '$PY' (set PYTHON=/path/to/python3.x)" >&2
  exit 1
}
# A missing or broken environment (an interrupted first run, no ensurepip then) is made again.
.venv/bin/python -m pip --version >/dev/null 2>&1 || "$PY" -m venv --clear .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[train,test,package]"

export QT_QPA_PLATFORM=offscreen
.venv/bin/lint-imports
.venv/bin/ruff check .
.venv/bin/python -m pytest "$@"
