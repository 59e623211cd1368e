#!/usr/bin/env bash
# GPU check of the training path (megatron-core DDP, its optimizer, bf16, dist checkpoints):
# two iterations with a checkpoint, then a resume for two more. Needs one NVIDIA GPU with
# megatron-ratplus and megatron-core installed; finishes in about a minute.
#   bash tools/gpu_check_train.sh [OUT_DIR]
set -euo pipefail
command -v nvidia-smi >/dev/null || { echo "gpu_check_train: needs an NVIDIA GPU" >&2; exit 2; }
out=${1:-${OUT:-/tmp}}/gpu_check_train
rm -rf "$out"
common=(--preset tiny --micro-batch-size 4 --global-batch-size 8 --eval-iters 2 --eval-interval 0
        --bf16 --no-progress-bar --save "$out/ck")
python3 -m megatron_ratplus.cli.pretrain "${common[@]}" --train-iters 2
python3 -m megatron_ratplus.cli.pretrain "${common[@]}" --train-iters 4 --load "$out/ck"
test "$(cat "$out/ck/latest")" = iter_0000004
python3 -m megatron_ratplus.cli.eval --load "$out/ck" --eval-samples 2 --patterns dense,dilated:16
echo "gpu_check_train: OK (2 iterations, checkpoint, resume to 4, eval)"
