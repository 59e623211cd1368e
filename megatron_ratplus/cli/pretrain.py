"""ratplus-pretrain: dense pretraining with active recurrence learning (see --help)."""

import sys

from megatron_ratplus.cli import run_cli


def main(argv=None) -> int:
    from megatron_ratplus.training import pretrain

    return run_cli("ratplus-pretrain", lambda: pretrain(argv if argv is not None else sys.argv[1:]))


if __name__ == "__main__":  # python -m megatron_ratplus.cli.pretrain (torchrun -m)
    sys.exit(main())
