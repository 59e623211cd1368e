#!/usr/bin/env bash
# One-step set-up on a fresh machine: install megatron-ratplus with its test dependencies.
# Without an NVIDIA GPU, torch is pinned to the CPU build first (an unpinned torch would pull
# a multi-GB CUDA build); with one, pip's own torch resolution is used.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! command -v nvidia-smi >/dev/null 2>&1; then
  "$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q -e ".[dev]"
