"""The sparse-inference part of ``ratplus-eval``: flags and one function that runs them.

``add_arguments(parser)`` adds the flags; ``run(model, tokens, args)`` prints the perplexity
table for ``args.patterns`` and, as asked, writes it (CSV/JSON), plots it (PNG), runs the
synthetic retrieval tasks and the pattern search.
"""

from __future__ import annotations

import argparse
import os
import sys

from megatron_ratplus.evaluation.perplexity import perplexity_table
from megatron_ratplus.evaluation.report import format_table, plot_perplexity_vs_dilation, write_table
from megatron_ratplus.evaluation.retrieval import TASKS, retrieval_table
from megatron_ratplus.evaluation.search import DEFAULT_CANDIDATES, search_patterns
from megatron_ratplus.patterns import split_pattern_list

PPL_COLUMNS = ("pattern", "loss", "perplexity", "cache_fraction")


def _int_list(text: str):
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sparse inference")
    group.add_argument("--table", help="write the perplexity table to this .csv or .json file")
    group.add_argument("--plot", help="write perplexity against D (with and without a window) to this .png")
    group.add_argument("--retrieval", nargs="*", choices=TASKS, default=None,
                       help="run RULER-style synthetic tasks per pattern (default all: " + ", ".join(TASKS) + ")")
    group.add_argument("--retrieval-lengths", type=_int_list, default=[256, 512, 1024],
                       help="context lengths for retrieval (default 256,512,1024)")
    group.add_argument("--retrieval-samples", type=int, default=8, help="samples per task and length")
    group.add_argument("--retrieval-table", help="write the retrieval accuracies to this .csv or .json file")
    group.add_argument("--search-budget", type=float, default=None,
                       help="choose per-layer patterns for a KV-cache budget: a fraction of dense (<= 1) or bytes")
    group.add_argument("--search-candidates", default=",".join(DEFAULT_CANDIDATES),
                       help="candidate patterns for the search (comma-separated)")


def check_arguments(args) -> None:
    """Fail before any evaluation runs on a bad output path or setting (ValueError, one line)."""
    for flag, path, exts in (("--table", args.table, (".csv", ".json")), ("--plot", args.plot, (".png",)),
                             ("--retrieval-table", args.retrieval_table, (".csv", ".json"))):
        if path is None:
            continue
        if os.path.splitext(path)[1].lower() not in exts:
            raise ValueError(f"{flag} '{path}' must end in {' or '.join(exts)}")
        if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise ValueError(f"{flag} '{path}': directory does not exist")
    if args.search_budget is not None and args.search_budget <= 0:
        raise ValueError(f"--search-budget must be > 0, got {args.search_budget}")
    split_pattern_list(args.patterns)
    split_pattern_list(args.search_candidates)


def run(model, tokens, args, tokenizer=None, out=None) -> dict:
    """Everything the flags ask for; returns {"perplexity": rows, "retrieval": rows, "search": result}."""
    out = out or sys.stdout
    check_arguments(args)
    patterns = split_pattern_list(args.patterns)
    results = {"perplexity": perplexity_table(model, tokens, patterns)}
    print(format_table(results["perplexity"], PPL_COLUMNS), file=out)
    if args.table:
        write_table(results["perplexity"], args.table)
    if args.plot:
        plot_perplexity_vs_dilation(results["perplexity"], args.plot)
    if args.retrieval is not None:
        results["retrieval"] = retrieval_table(model, patterns, args.retrieval_lengths, args.retrieval or TASKS,
                                               args.retrieval_samples, tokenizer=tokenizer)
        print(format_table(results["retrieval"]), file=out)
        if args.retrieval_table:
            write_table(results["retrieval"], args.retrieval_table)
    if args.search_budget is not None:
        budget = dict(budget_fraction=args.search_budget) if args.search_budget <= 1 else \
            dict(budget_bytes=int(args.search_budget))
        results["search"] = search_patterns(model, tokens, candidates=split_pattern_list(args.search_candidates),
                                            **budget)
        print(results["search"].summary(), file=out)
    return results
