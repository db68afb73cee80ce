#!/usr/bin/env bash
# The GPU check (issue 20): one table of what one CUDA GPU gets from this project, within 8 minutes
# including setup. On a machine without a GPU it runs the CPU parts, prints "no GPU" and exits 0.
#   benchmarks/gpu_check.sh                        # 2,000 snippets, 2 epochs
#   benchmarks/gpu_check.sh --limit 120 --epochs 1 # the CI smoke size
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${UNIPT_PYTHON:-.venv/bin/python}"
if [ ! -x "$PY" ]; then
    ./setup.sh  # a fresh machine: make the environment first (counted in the 8 minutes)
fi
# Leave time for setup: the check itself stops after 7 minutes rather than overrun.
exec timeout 420 "$PY" benchmarks/gpu_check.py "$@"
