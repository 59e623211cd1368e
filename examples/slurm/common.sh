# Shared launch logic of the sbatch scripts in this folder (sourced, not run).
#
# Set before submitting (sbatch passes the environment on):
#   DATA       indexed dataset prefix, or a weighted blend "0.7 PREFIX_A 0.3 PREFIX_B"
#              (FineWeb-Edu tokenized with tools/preprocess_data.py and the LLaMA-2 tokenizer)
#   TOKENIZER  the tokenizer file it was built with (tokenizer.model or tokenizer.json; "byte")
#   RUN_DIR    where checkpoints and TensorBoard logs go
# Optional:
#   RATPLUS_HOME      the repository (default: the job's working directory, i.e. where sbatch
#                     was called from, or its --chdir)
#   CONTAINER_IMAGE   run inside this image with pyxis/enroot (srun --container-image);
#                     CONTAINER_MOUNTS is passed as --container-mounts (default: RATPLUS_HOME, RUN_DIR)
#   VENV              a virtual environment to activate instead
#   PRECISION         default "--bf16" (set it empty on a CPU)
#   RATPLUS_OVERRIDES extra ratplus-pretrain flags, appended last (they win over the YAML)
#   NCCL_* / TORCH_*  any of the settings below, to override them
#
# srun starts one task per GPU (the scripts' --ntasks-per-node), each the training process
# itself (examples/slurm/rank.sh), so SLURM's signals reach the processes that save. Time limits
# and preemption (SIGUSR1 -> save -> requeue; SIGTERM -> save within KillWait): see
# examples/slurm/README.md. Outside a SLURM job (`bash SCRIPT` on a laptop), `srun` and
# `scontrol` are replaced by local stand-ins that run one process, so the scripts run unchanged.

: "${DATA:?set DATA to the indexed dataset prefix (or a weighted blend)}"
: "${TOKENIZER:?set TOKENIZER to the tokenizer file}"
: "${RUN_DIR:?set RUN_DIR to the run directory}"
cd "$RATPLUS_HOME"
mkdir -p "$RUN_DIR"

if [[ -z "${SLURM_JOB_ID:-}" ]]; then
  # Not in a SLURM job: one local task. srun runs its command here (exec, so signals reach it
  # directly), scontrol answers hostnames and records a requeue request in RUN_DIR/requeue.log.
  echo "common.sh: not in a SLURM job: one local process, with stand-ins for srun and scontrol" >&2
  export SLURM_JOB_ID=$$ SLURM_JOB_NODELIST=localhost
  srun() { while [[ $1 == --* ]]; do shift; done; SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_NTASKS=1 exec "$@"; }
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

# SLURM 22.05+ no longer passes the job's --cpus-per-task on to srun by itself.
[[ -z "${SLURM_CPUS_PER_TASK:-}" ]] || export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK

# Rendezvous: rank 0 on the job's first node, at a port derived from the job id, so that jobs
# sharing a node never meet (a requeued job keeps its id, and its port).
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=$((10000 + SLURM_JOB_ID % 20000))
export MASTER_ADDR MASTER_PORT
read -r -a DATA_PATH <<< "$DATA"
read -r -a PRECISION_ARGS <<< "${PRECISION---bf16}"
read -r -a OVERRIDES <<< "${RATPLUS_OVERRIDES:-}"
LAUNCH=(srun "${SRUN_ARGS[@]}" bash "$RATPLUS_HOME/examples/slurm/rank.sh" python -m megatron_ratplus.cli.pretrain)

# run_training CONFIG.yaml [FLAG ...]: one srun step of training. SIGUSR1 to this batch shell
# (--signal=B:USR1@600, or scancel --batch --signal=USR1) goes on to srun, which forwards it to
# every task once; the tasks save and exit, and the job requeues itself (whatever their exit
# status: the time limit ends the job anyway, and the requeued one resumes from the newest
# checkpoint). SIGTERM (scancel, preemption) reaches every task from SLURM directly: this shell
# only waits for them to save.
run_training() {
  local config=$1 status signalled=0 pid
  shift
  "${LAUNCH[@]}" --config "$config" --data-path "${DATA_PATH[@]}" --tokenizer-file "$TOKENIZER" \
    --exit-signal-handler "${PRECISION_ARGS[@]}" "$@" "${OVERRIDES[@]}" &
  pid=$!
  trap 'signalled=1; kill -USR1 "$pid" 2>/dev/null' USR1
  trap 'echo "run_training: SIGTERM: waiting for the training processes to save"' TERM
  while true; do  # a trapped signal interrupts wait (status > 128); keep waiting while the launch runs
    wait "$pid" && status=0 || status=$?  # (written so that set -e does not end the script here)
    kill -0 "$pid" 2>/dev/null || break
  done
  trap - USR1 TERM
  if [[ $signalled == 1 ]]; then
    echo "run_training: SIGUSR1: training exited $status; requeueing job $SLURM_JOB_ID to resume from the newest checkpoint"
    scontrol requeue "$SLURM_JOB_ID"
  fi
  return "$status"
}
