#!/bin/bash
# One training process of the job: srun starts this once per GPU. torch.distributed's env://
# variables come from SLURM's task variables (MASTER_ADDR and MASTER_PORT from common.sh). exec,
# so that the signals SLURM sends the task reach the training process itself and nothing in
# between has to survive them; until that process installs its handler (--exit-signal-handler),
# a SIGUSR1 is ignored rather than fatal (examples/slurm/README.md).
export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS
trap '' USR1
exec "$@"
