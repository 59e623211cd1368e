#!/usr/bin/env bash
# GPU check of the Triton kernels (issue 6): correctness at realistic sizes, then timings.
# Needs torch + triton and one CUDA GPU, not megatron-core; finishes in < 8 min on one H200.
# Usage: tools/gpu_check.sh [--json PATH]   (default $OUT/gpu_check.json, else ./gpu_check.json)
#        tools/gpu_check.sh --dry-run       (toy sizes on CPU under the Triton interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
exec timeout 470 python tools/gpu_check.py "$@"
