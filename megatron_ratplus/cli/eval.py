"""ratplus-eval: validation perplexity of a trained checkpoint under several attention patterns.

    ratplus-eval --load checkpoints/ratplus-tiny --patterns dense,dilated:4,dilated:16,dilated:64

The validation split is the one the checkpoint was trained with (embedded corpus or its
--data-path) unless --data-path is given.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import List

from megatron_ratplus.checkpoint import CheckpointError
from megatron_ratplus.cli import run_cli
from megatron_ratplus.data.tokenizer import DataError
from megatron_ratplus.patterns import KINDS, PatternError, parse_pattern


class EvalUsageError(ValueError):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise EvalUsageError(message)


def split_patterns(text: str) -> List[str]:
    """Split a comma list of patterns; a part like ``w=256`` continues the previous pattern."""
    patterns: List[str] = []
    for part in (p.strip() for p in text.split(",")):
        head = part.split(":", 1)[0].strip().lower()
        if head in KINDS or not patterns:
            patterns.append(part)
        else:
            patterns[-1] += "," + part
    for p in patterns:
        parse_pattern(p)
    return patterns


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ratplus-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="checkpoint directory (a save dir or one iter_* dir)")
    p.add_argument("--patterns", default="dense,dilated:4,dilated:16,dilated:64",
                   help="comma-separated patterns, e.g. dense,dilated:16,w=256,p=4,local:w=64")
    p.add_argument("--eval-iters", type=int, default=20, help="validation micro-batches")
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--data-path", nargs="+", help="indexed dataset prefixes (default: the checkpoint's data)")
    return p


def perplexity_table(args) -> List[tuple]:
    from megatron_ratplus.checkpoint import load_model, read_meta
    from megatron_ratplus.data.datasets import build_datasets, collate
    from megatron_ratplus.training.steps import evaluate

    if args.eval_iters < 1 or args.micro_batch_size < 1:
        raise EvalUsageError("--eval-iters and --micro-batch-size must be >= 1")
    patterns = split_patterns(args.patterns)
    train_args = read_meta(args.load)["args"]
    model, config, tokenizer = load_model(args.load)
    samples = args.eval_iters * args.micro_batch_size
    _, valid = build_datasets(args.data_path or train_args.get("data_path"), tokenizer, config.seq_length,
                              train_args.get("seed", 1234), train_args.get("split", "98,2,0"), 1, samples)
    n = min(len(valid), samples) // args.micro_batch_size
    if n == 0:
        raise DataError(f"the validation split has fewer than --micro-batch-size {args.micro_batch_size} samples")
    micro = [collate([valid[i * args.micro_batch_size + j] for j in range(args.micro_batch_size)]) for i in range(n)]
    rows = []
    for pattern in patterns:
        loss = evaluate([model], micro, config.seq_length, pattern)
        rows.append((pattern, loss, math.exp(min(loss, 50)), parse_pattern(pattern).cache_slots(config.seq_length)))
    return rows


def main(argv=None) -> int:
    def run():
        args = build_parser().parse_args(argv if argv is not None else sys.argv[1:])
        rows = perplexity_table(args)
        width = max(len(r[0]) for r in rows) + 2
        print(f"{'pattern':{width}s} {'val loss':>9s} {'perplexity':>11s} {'KV slots':>9s}")
        for pattern, loss, ppl, slots in rows:
            print(f"{pattern:{width}s} {loss:9.4f} {ppl:11.3f} {slots:9d}")

    return run_cli("ratplus-eval", run, (EvalUsageError, CheckpointError, DataError, PatternError))


if __name__ == "__main__":
    sys.exit(main())
