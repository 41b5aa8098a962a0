#!/usr/bin/env bash
# The GPU check, as is, on a machine with one GPU (H100/H200; under 8 minutes there):
#     bash bench/gpu_check.sh
# Installs the project into its own venv (.venv-gpu, with PyPI's CUDA build of torch unless TORCH_SPEC
# says otherwise; Transformer Engine, if wanted, is yours to add: pip install transformer_engine[pytorch]),
# then runs bench/gpu_check.py: bf16 training of a ~1B Llama on each backend from one init, tokens/s
# and MFU for each, first-step loss parity, and the conversion back to HF verified. Prints one table.
# PYTHON=<a python that already has everything> skips the install. Extra arguments go to gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    make setup VENV="${VENV:-.venv-gpu}" TORCH_SPEC="${TORCH_SPEC:-torch}"
    PYTHON="${VENV:-.venv-gpu}/bin/python"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec timeout "${LIMIT:-480}" "$PYTHON" bench/gpu_check.py "$@"
