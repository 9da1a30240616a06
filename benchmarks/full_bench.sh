#!/usr/bin/env bash
# Full `snapgen bench` run: writes docs/performance.md and keeps the JSON report.
# Run from the repository root on a quiet machine (about 35-45 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p benchmarks/results
stamp=$(date -u +%Y%m%dT%H%M%SZ)
.venv/bin/snapgen bench --json --out docs/performance.md "$@" > "benchmarks/results/bench-${stamp}.json"
echo "report: docs/performance.md, JSON: benchmarks/results/bench-${stamp}.json"
