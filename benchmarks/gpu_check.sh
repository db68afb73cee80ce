#!/usr/bin/env bash
# The GPU check (issues 20, 29): one table of what one CUDA GPU gets from this project, within 8 minutes
# including setup. On a machine without an NVIDIA GPU it runs the CPU parts, prints "no GPU" and exits 0;
# on a machine WITH one that torch cannot use (a CPU wheel, a driver too old) it fails, naming the cause.
#   benchmarks/gpu_check.sh                        # 2,000 snippets, 2 epochs
#   benchmarks/gpu_check.sh --limit 120 --epochs 1 # the CI smoke size
# UNIPT_PYTHON: the interpreter to check with (nothing is installed then); UNIPT_GPU_CHECK_SECONDS: the
# budget for setup and check together (default 480).
set -euo pipefail
cd "$(dirname "$0")/.."

# One timeout bounds setup and check together: the script runs itself again under it, once.
if [ -z "${UNIPT_GPU_CHECK_BOUNDED:-}" ]; then
    export UNIPT_GPU_CHECK_BOUNDED=1
    set +e
    timeout "${UNIPT_GPU_CHECK_SECONDS:-480}" "$0" "$@"
    code=$?
    set -e
    if [ "$code" -eq 124 ]; then
        echo "gpu check: stopped after ${UNIPT_GPU_CHECK_SECONDS:-480}s (setup and check); the rows above are what was measured" >&2
    fi
    exit "$code"
fi

nvidia_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q "^GPU "; }

# What torch in "$1" can do here: "cuda", or why not ("cpu-build <version>", "no-device <cuda version>").
torch_cuda() {
    "$1" - <<'EOF' 2>/dev/null || echo "no-torch"
import torch
if torch.cuda.is_available():
    print("cuda")
elif torch.version.cuda is None:
    print(f"cpu-build {torch.__version__}")
else:
    print(f"no-device {torch.version.cuda}")
EOF
}

if [ -n "${UNIPT_PYTHON:-}" ]; then
    PY="$UNIPT_PYTHON"
elif nvidia_gpu; then
    # A GPU machine: an existing .venv may hold setup.sh's CPU wheel, so check in an environment of its
    # own, with only what the check needs (the CUDA wheel pip serves here, the extract and tune extras).
    VENV=.venv-gpu-check
    PY="$VENV/bin/python"
    if [ "$(torch_cuda "$PY")" != "cuda" ]; then
        echo "gpu check: making $VENV (torch with CUDA, the extract and tune extras)" >&2
        [ -x "$PY" ] || python3 -m venv "$VENV"
        PIP="$PY -m pip --quiet --disable-pip-version-check"
        $PIP install "torch==2.13.0"
        $PIP install -c requirements-lock.txt -e ".[extract,tune]"
        $PIP install --no-deps -r requirements-assets.txt
    fi
else
    PY=.venv/bin/python
    [ -x "$PY" ] || ./setup.sh  # a fresh machine without a GPU: the project's own environment
fi

if nvidia_gpu; then
    state="$(torch_cuda "$PY")"
    if [ "$state" != "cuda" ]; then
        case "$state" in
            cpu-build*) why="torch ${state#cpu-build } is a CPU-only build (torch.version.cuda is None)" ;;
            no-device*) why="torch is built for CUDA ${state#no-device } but cannot use the GPU (a driver too old for it?)" ;;
            *) why="$PY cannot import torch" ;;
        esac
        echo "gpu check: error: nvidia-smi sees $(nvidia-smi -L | head -1) but $why; install a CUDA build of torch the driver supports (or unset UNIPT_PYTHON)" >&2
        exit 1
    fi
fi

# Unbuffered: each row is printed as it is measured, so a timeout keeps the rows before it.
PYTHONUNBUFFERED=1 "$PY" benchmarks/gpu_check.py "$@"
