"""Pretraining: flags, the training config, optimizer, schedule, data parallelism, steps, metrics
and the loop (one job per module)."""

from typing import List, Optional


def pretrain(argv: Optional[List[str]] = None) -> str:
    """Run ratplus-pretrain with CLI flags ``argv``; returns the final checkpoint directory ("" for
    --dry-run, which prints the run's estimate and trains nothing)."""
    from megatron_ratplus.training.arguments import parse_flags
    from megatron_ratplus.training.config import TrainingConfig
    from megatron_ratplus.training.loop import train

    config = TrainingConfig.from_flags(parse_flags(argv))
    if config.dry_run:
        from megatron_ratplus.training.dry_run import dry_run

        print(dry_run(config))
        return ""
    return train(config)
