#!/usr/bin/env bash
# One GPU check of megatron-ratplus on a single H200, under 8 minutes, JSON out (see tools/gpu_check.py):
# kernel correctness, the training path (local / Transformer Engine / FP8 runs, checkpoint resume
# with the distributed optimizer, FP8 precision boundaries, context-parallel building blocks,
# DALI loader), then kernel timings. Sections are guarded: a failing one does not stop the others.
# Usage: tools/gpu_check.sh [--json PATH] [--wheels DIR] [--sections a,b]  (default JSON: $OUT/gpu_check.json)
#        tools/gpu_check.sh --dry-run       (toy sizes on CPU under the Triton interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
exec timeout 470 python3 tools/gpu_check.py "$@"
