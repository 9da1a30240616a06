#!/usr/bin/env bash
# Smoke test of every benchmark code path at 256 px (a few minutes on a quiet machine).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/snapgen bench --quick --out - "$@"
