# Shared launch logic of the sbatch scripts in this folder (sourced, not run).
#
# Set before submitting (sbatch passes the environment on):
#   DATA       indexed dataset prefix, or a weighted blend "0.7 PREFIX_A 0.3 PREFIX_B"
#              (FineWeb-Edu tokenized with tools/preprocess_data.py and the LLaMA-2 tokenizer)
#   TOKENIZER  the tokenizer file it was built with (tokenizer.model or tokenizer.json; "byte")
#   RUN_DIR    where checkpoints and TensorBoard logs go
# Optional:
#   RATPLUS_HOME      the repository (default: the directory sbatch was called from)
#   CONTAINER_IMAGE   run inside this image with pyxis/enroot (srun --container-image);
#                     CONTAINER_MOUNTS is passed as --container-mounts (default: RATPLUS_HOME, RUN_DIR)
#   VENV              a virtual environment to activate instead
#   GPUS_PER_NODE     default 8;  MASTER_PORT default 29500
#   PRECISION         default "--bf16" (set it empty on a CPU)
#   RATPLUS_OVERRIDES extra ratplus-pretrain flags, appended last (they win over the YAML)
#   NCCL_* / TORCH_*  any of the settings below, to override them
#
# Preemption and time limits: the scripts ask for `--requeue --signal=B:USR1@600`. SLURM sends
# SIGUSR1 to this batch shell 10 minutes before the time limit; run_training passes it to every
# training process (examples/slurm/node.sh), which finish the iteration, save and exit 0
# (ratplus-pretrain --exit-signal-handler); the job then requeues itself and the next run resumes
# through --load SAVE --save SAVE. Without SLURM (a laptop), `srun` and `scontrol` are replaced
# by local stand-ins so the same scripts run unchanged.

: "${DATA:?set DATA to the indexed dataset prefix (or a weighted blend)}"
: "${TOKENIZER:?set TOKENIZER to the tokenizer file}"
: "${RUN_DIR:?set RUN_DIR to the run directory}"
cd "$RATPLUS_HOME"
mkdir -p "$RUN_DIR"

if ! command -v srun >/dev/null 2>&1; then
  # No SLURM: one local "node". srun runs its command here (exec, so signals reach it directly),
  # scontrol answers hostnames and records a requeue request in RUN_DIR/requeue.log.
  export SLURM_JOB_ID=${SLURM_JOB_ID:-local-$$} SLURM_NNODES=${SLURM_NNODES:-1}
  export SLURM_JOB_NODELIST=${SLURM_JOB_NODELIST:-localhost}
  srun() { while [[ $# -gt 0 && $1 == --* ]]; do shift; done; exec "$@"; }
  scontrol() {
    case "$1" in
      show) echo localhost ;;
      requeue) echo "requeue $2" >> "$RUN_DIR/requeue.log" ;;
      *) echo "scontrol stand-in: unsupported '$*'" >&2; return 1 ;;
    esac
  }
fi

# Software environment: a container (pyxis/enroot) or a virtual environment.
SRUN_ARGS=(--kill-on-bad-exit=1)
if [[ -n "${CONTAINER_IMAGE:-}" ]]; then
  SRUN_ARGS+=(--container-image "$CONTAINER_IMAGE" --container-workdir "$RATPLUS_HOME"
              --container-mounts "${CONTAINER_MOUNTS:-$RATPLUS_HOME:$RATPLUS_HOME,$RUN_DIR:$RUN_DIR}")
elif [[ -n "${VENV:-}" ]]; then
  # shellcheck disable=SC1091
  source "$VENV/bin/activate"
fi

# Settings commonly used on InfiniBand clusters; each keeps a value already in the environment.
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}   # megatron's TP/SP comm overlap ordering
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}  # a failed rank ends the job
export TORCH_NCCL_AVOID_RECORD_STREAMS=${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}                  # tolerate fabric hiccups at scale
export NCCL_IB_QPS_PER_CONNECTION=${NCCL_IB_QPS_PER_CONNECTION:-4}
export NCCL_CROSS_NIC=${NCCL_CROSS_NIC:-0}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
# Cluster-specific, left to the site when unset: NCCL_SOCKET_IFNAME (e.g. ib0 or eth0),
# NCCL_IB_HCA (e.g. mlx5), NCCL_NET_GDR_LEVEL.

MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_ADDR MASTER_PORT=${MASTER_PORT:-29500}
read -r -a DATA_PATH <<< "$DATA"
read -r -a PRECISION_ARGS <<< "${PRECISION---bf16}"
read -r -a OVERRIDES <<< "${RATPLUS_OVERRIDES:-}"
LAUNCH=(srun "${SRUN_ARGS[@]}" bash "$RATPLUS_HOME/examples/slurm/node.sh"
        python -m torch.distributed.run --nnodes "$SLURM_NNODES" --nproc-per-node "${GPUS_PER_NODE:-8}"
        --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" -m megatron_ratplus.cli.pretrain)

# run_training CONFIG.yaml [FLAG ...]: launch, pass SIGUSR1/SIGTERM on, requeue after a signal.
run_training() {
  local config=$1 status signalled=0 pid
  shift
  "${LAUNCH[@]}" --config "$config" --data-path "${DATA_PATH[@]}" --tokenizer-file "$TOKENIZER" \
    --exit-signal-handler "${PRECISION_ARGS[@]}" "$@" "${OVERRIDES[@]}" &
  pid=$!
  trap 'signalled=1; kill -USR1 "$pid" 2>/dev/null' USR1
  trap 'kill -TERM "$pid" 2>/dev/null' TERM
  while true; do  # a trapped signal interrupts wait; keep waiting while the launch runs
    wait "$pid"; status=$?
    kill -0 "$pid" 2>/dev/null || break
  done
  trap - USR1 TERM
  if [[ $signalled == 1 && $status == 0 ]]; then
    echo "run_training: stopped on SIGUSR1 with a checkpoint; requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
  fi
  return "$status"
}
