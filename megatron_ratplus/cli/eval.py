"""ratplus-eval: a trained checkpoint under several attention patterns, no retraining.

    ratplus-eval --load checkpoints/ratplus-tiny --patterns dense,dilated:4,dilated:16,dilated:64

Prints validation perplexity per pattern (and its decode KV cache relative to dense); with the
sparse-inference flags it also writes the table (CSV/JSON), plots perplexity against D, runs
synthetic passkey / multi-key retrieval and searches per-layer patterns for a KV budget. The
validation split is the checkpoint's own (embedded corpus or its --data-path) unless
--data-path is given.
"""

from __future__ import annotations

import argparse
import sys

from megatron_ratplus.checkpoint import CheckpointError
from megatron_ratplus.cli import run_cli
from megatron_ratplus.data.tokenizer import DataError
from megatron_ratplus.patterns import PatternError


class EvalUsageError(ValueError):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise EvalUsageError(message)


def build_parser() -> argparse.ArgumentParser:
    from megatron_ratplus.evaluation import suite

    p = _Parser(prog="ratplus-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="checkpoint directory (a save dir or one iter_* dir)")
    p.add_argument("--patterns", default="dense,dilated:4,dilated:16,dilated:64",
                   help="comma-separated patterns or compositions, e.g. dense,dilated:16,w=256,p=4,local:w=64")
    p.add_argument("--eval-samples", type=int, default=64, help="validation windows to score")
    p.add_argument("--data-path", nargs="+", help="indexed dataset prefixes (default: the checkpoint's data)")
    suite.add_arguments(p)
    return p


def evaluate(argv) -> dict:
    from megatron_ratplus.checkpoint import load_model, read_meta
    from megatron_ratplus.data import validation_windows
    from megatron_ratplus.evaluation import suite

    args = build_parser().parse_args(argv)
    if args.eval_samples < 1:
        raise EvalUsageError("--eval-samples must be >= 1")
    try:
        suite.check_arguments(args)
    except ValueError as err:  # bad output paths, budgets or patterns
        raise EvalUsageError(str(err)) from None
    train_args = read_meta(args.load)["args"]
    model, config, tokenizer = load_model(args.load)
    tokens = validation_windows(tokenizer, config.seq_length, args.eval_samples,
                                args.data_path or train_args.get("data_path"),
                                train_args.get("seed", 1234), train_args.get("split", "98,2,0"))
    return suite.run(model, tokens, args, encode=tokenizer.encode)


def main(argv=None) -> int:
    return run_cli("ratplus-eval", lambda: evaluate(argv if argv is not None else sys.argv[1:]),
                   (EvalUsageError, CheckpointError, DataError, PatternError))


if __name__ == "__main__":
    sys.exit(main())
