"""Pretraining: arguments, optimizer, steps, metrics and the loop (one job per module)."""

from typing import List, Optional


def pretrain(argv: Optional[List[str]] = None) -> str:
    """Run ratplus-pretrain with CLI flags ``argv``; returns the final checkpoint directory."""
    from megatron_ratplus.training.arguments import parse_args
    from megatron_ratplus.training.loop import pretrain as run

    return run(parse_args(argv))
