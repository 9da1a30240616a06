#!/usr/bin/env bash
# Run `snapgen` on a fresh machine: creates a torch-free virtual environment on first use (the
# runtime needs only onnxruntime, numpy, tokenizers, pillow), then passes every argument on.
#   ./scripts/snapgen.sh generate "a red apple on a yellow background" -o apple.png
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
if [ ! -x "$here/.venv/bin/snapgen" ]; then
  "${PYTHON:-python3}" -m venv "$here/.venv"
  "$here/.venv/bin/python" -m pip install -q --upgrade pip
  "$here/.venv/bin/python" -m pip install -q -e "$here"
fi
exec "$here/.venv/bin/snapgen" "$@"
