# Shared launch settings for the sbatch scripts in this folder (sourced, not run).
# Set DATA (indexed dataset prefix of FineWeb-Edu tokenized with tools/preprocess_data.py and
# the LLaMA-2 tokenizer), TOKENIZER (its tokenizer.json) and RUN_DIR before submitting.
: "${DATA:?set DATA to the indexed dataset prefix}"
: "${TOKENIZER:?set TOKENIZER to the tokenizer.json}"
: "${RUN_DIR:?set RUN_DIR to the run directory}"
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=${MASTER_PORT:-29500}
export CUDA_DEVICE_MAX_CONNECTIONS=1
LAUNCH=(srun --kill-on-bad-exit=1 torchrun --nnodes "$SLURM_NNODES" --nproc-per-node "${GPUS_PER_NODE:-8}"
        --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" -m megatron_ratplus.cli.pretrain)
DATA_ARGS=(--data-path "$DATA" --tokenizer-file "$TOKENIZER" --split 998,2,0 --seq-length 4096)
# The authors' optimizer settings (DESIGN §1): AdamW (0.9, 0.95), wd 0.1, clip 1.0, 5% warmup, cosine to 1e-6.
OPT_ARGS=(--adam-beta1 0.9 --adam-beta2 0.95 --weight-decay 0.1 --clip-grad 1.0 --min-lr 1e-6
          --lr-decay-style cosine --bf16 --use-distributed-optimizer)
LOG_ARGS=(--save-interval 1000 --eval-interval 1000 --eval-iters 20 --log-interval 10)
