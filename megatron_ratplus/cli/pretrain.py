"""ratplus-pretrain: dense pretraining with active recurrence learning (see --help)."""

import sys

from megatron_ratplus.checkpoint import CheckpointError
from megatron_ratplus.cli import run_cli
from megatron_ratplus.data.tokenizer import DataError
from megatron_ratplus.patterns import PatternError


def main(argv=None) -> int:
    from megatron_ratplus.training import pretrain
    from megatron_ratplus.training.arguments import UsageError
    from megatron_ratplus.training.loop import TrainingStopped

    return run_cli("ratplus-pretrain", lambda: pretrain(argv if argv is not None else sys.argv[1:]),
                   (UsageError, DataError, CheckpointError, PatternError, TrainingStopped))


if __name__ == "__main__":  # python -m megatron_ratplus.cli.pretrain (torchrun -m)
    sys.exit(main())
