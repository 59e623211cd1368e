"""--dry-run: the run's parameter, FLOP, memory and time estimate, before any process group starts."""

from __future__ import annotations

import os

from megatron_ratplus.errors import UserError
from megatron_ratplus.estimate import Layout, report


def dry_run(config) -> str:
    """megatron_ratplus.estimate's report for this TrainingConfig's model, layout and batch; a
    UserError (exit status 2) with the reason when the layout does not fit --gpu-memory-gb."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    tp, pp, cp = (config.tensor_model_parallel_size, config.pipeline_model_parallel_size,
                  config.context_parallel_size)
    layout = Layout(tensor=tp, pipeline=pp, context=cp, data=max(1, world // (tp * pp * cp)),
                    sequence_parallel=config.sequence_parallel,
                    distributed_optimizer=config.use_distributed_optimizer)
    text, fits, reason = report(config.model_config(), layout, config.micro_batch_size, config.global_batch_size,
                                config.train_iters, gpu_memory_gb=config.gpu_memory_gb,
                                seq_length=config.seq_length, patterns=[p for _, p in config.step_patterns],
                                bf16=config.bf16, recompute=config.recompute_granularity == "full")
    if not fits:
        raise UserError(f"--dry-run: {reason}")
    return text
