#!/usr/bin/env bash
# Run `snapgen` on a fresh machine: creates a torch-free virtual environment on first use (the
# runtime needs only onnxruntime, numpy, tokenizers, pillow), then passes every argument on.
#   ./scripts/snapgen.sh generate "a red apple on a yellow background" -o apple.png
# The environment is repaired when it is broken (an interrupted first run, a removed Python) and
# brought up to date when pyproject.toml changed (a new dependency after a git pull).
set -euo pipefail
src="${BASH_SOURCE[0]}"
while [ -L "$src" ]; do  # called through a symlink (e.g. ~/bin/snapgen): find the repository
  dir="$(cd -P "$(dirname "$src")" && pwd)"
  src="$(readlink "$src")"
  [[ $src == /* ]] || src="$dir/$src"
done
here="$(cd -P "$(dirname "$src")/.." && pwd)"
PY=${PYTHON:-python3}
venv="$here/.venv"
stamp="$venv/.snapgen-setup"
want="$(cksum < "$here/pyproject.toml")"
if ! "$venv/bin/python" -c 'import importlib.metadata as m; m.version("snapgen-studio")' >/dev/null 2>&1 || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null || {
    echo "snapgen: needs Python 3.10 or newer as '$PY' (set PYTHON=/path/to/python3.x)" >&2
    exit 1
  }
  "$venv/bin/python" -m pip --version >/dev/null 2>&1 || "$PY" -m venv --clear "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q -e "$here"
  printf '%s\n' "$want" > "$stamp"
fi
exec "$venv/bin/snapgen" "$@"
