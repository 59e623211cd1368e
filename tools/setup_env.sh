#!/usr/bin/env bash
# One-step set-up on a fresh machine: install megatron-ratplus with its test dependencies at the
# exact versions the suite last passed with (constraints.txt; tools/refresh_pins.sh remakes it).
# Without an NVIDIA GPU the pinned torch is the CPU build (an unpinned torch would pull a
# multi-GB CUDA build). With one, torch, triton and the CUDA libraries come from pip's own CUDA
# resolution and everything else is pinned.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PINS=constraints.txt
if command -v nvidia-smi >/dev/null 2>&1; then
  PINS=$(mktemp)
  trap 'rm -f "$PINS"' EXIT
  grep -viE '^(torch|triton|nvidia-)[a-z0-9-]*==' constraints.txt > "$PINS"
else
  "$PY" -m pip install -q -c "$PINS" torch
fi
"$PY" -m pip install -q -c "$PINS" -e ".[dev]"
