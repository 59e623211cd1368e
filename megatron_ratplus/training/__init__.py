"""Pretraining: flags, the training config, optimizer, schedule, data parallelism, steps, metrics
and the loop (one job per module)."""

from typing import List, Optional


def pretrain(argv: Optional[List[str]] = None) -> str:
    """Run ratplus-pretrain with CLI flags ``argv``; returns the final checkpoint directory."""
    from megatron_ratplus.training.arguments import parse_flags
    from megatron_ratplus.training.config import TrainingConfig
    from megatron_ratplus.training.loop import train

    return train(TrainingConfig.from_flags(parse_flags(argv)))
