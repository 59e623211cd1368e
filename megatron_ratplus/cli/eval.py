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
import os
import sys

from megatron_ratplus.cli import run_cli
from megatron_ratplus.data.datasets import DEFAULT_SEED, DEFAULT_SPLIT
from megatron_ratplus.errors import ArgumentParser, UserError
from megatron_ratplus.evaluation.retrieval import BYTE_ENCODE, TASKS
from megatron_ratplus.evaluation.search import DEFAULT_CANDIDATES
from megatron_ratplus.evaluation.suite import RETRIEVAL_LENGTHS
from megatron_ratplus.patterns import split_pattern_list


def _int_list(text: str):
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The sparse-inference flags (evaluation/suite.py's arguments)."""
    group = parser.add_argument_group("sparse inference")
    group.add_argument("--table", help="write the perplexity table to this .csv or .json file")
    group.add_argument("--plot", help="write perplexity against D (with and without a window) to this .png")
    group.add_argument("--retrieval", nargs="*", choices=TASKS, default=None,
                       help="run synthetic retrieval (passkey, multikey; default both) per pattern")
    group.add_argument("--retrieval-lengths", type=_int_list, default=list(RETRIEVAL_LENGTHS),
                       help="context lengths for retrieval (default %s)" % ",".join(map(str, RETRIEVAL_LENGTHS)))
    group.add_argument("--retrieval-samples", type=int, default=8, help="samples per task and length")
    group.add_argument("--retrieval-table", help="write the retrieval accuracies to this .csv or .json file")
    group.add_argument("--search-budget", type=float, default=None,
                       help="choose per-layer patterns for a KV-cache budget: a fraction of dense (<= 1) or bytes")
    group.add_argument("--search-candidates", default=",".join(DEFAULT_CANDIDATES),
                       help="candidate patterns for the search (comma-separated)")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="ratplus-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="checkpoint directory (a save dir or one iter_* dir)")
    p.add_argument("--patterns", default="dense,dilated:4,dilated:16,dilated:64",
                   help="comma-separated patterns or compositions, e.g. dense,dilated:16,w=256,p=4,local:w=64")
    p.add_argument("--eval-samples", type=int, default=64, help="validation windows to score")
    p.add_argument("--data-path", nargs="+", help="indexed dataset prefixes (default: the checkpoint's data)")
    add_arguments(p)
    return p


def check_arguments(args) -> None:
    """Fail before any evaluation runs on a bad output path or setting (UserError, one line)."""
    for flag, path, exts in (("--table", args.table, (".csv", ".json")), ("--plot", args.plot, (".png",)),
                             ("--retrieval-table", args.retrieval_table, (".csv", ".json"))):
        if path is None:
            continue
        if os.path.splitext(path)[1].lower() not in exts:
            raise UserError(f"{flag} '{path}' must end in {' or '.join(exts)}")
        if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise UserError(f"{flag} '{path}': directory does not exist")
    if args.search_budget is not None and args.search_budget <= 0:
        raise UserError(f"--search-budget must be > 0, got {args.search_budget}")
    split_pattern_list(args.patterns)
    split_pattern_list(args.search_candidates)


def run_suite(model, tokens, args, encode=BYTE_ENCODE, out=None) -> dict:
    """Check the sparse-inference flags, then run evaluation/suite.py with their values."""
    from megatron_ratplus.evaluation import suite

    check_arguments(args)
    return suite.run(model, tokens, split_pattern_list(args.patterns), table=args.table, plot=args.plot,
                     retrieval=args.retrieval, retrieval_lengths=args.retrieval_lengths,
                     retrieval_samples=args.retrieval_samples, retrieval_table_path=args.retrieval_table,
                     search_budget=args.search_budget, search_candidates=split_pattern_list(args.search_candidates),
                     encode=encode, out=out)


def evaluate(argv) -> dict:
    from megatron_ratplus.checkpoint import load_model, read_meta
    from megatron_ratplus.data import validation_windows

    args = build_parser().parse_args(argv)
    if args.eval_samples < 1:
        raise UserError("--eval-samples must be >= 1")
    check_arguments(args)
    train_args = read_meta(args.load)["args"]
    model, config, tokenizer = load_model(args.load)
    tokens = validation_windows(tokenizer, config.seq_length, args.eval_samples,
                                args.data_path or train_args.get("data_path"),
                                train_args.get("seed", DEFAULT_SEED), train_args.get("split", DEFAULT_SPLIT))
    return run_suite(model, tokens, args, encode=tokenizer.encode)


def main(argv=None) -> int:
    return run_cli("ratplus-eval", lambda: evaluate(argv if argv is not None else sys.argv[1:]))


if __name__ == "__main__":
    sys.exit(main())
