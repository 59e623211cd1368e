"""ratplus-eval: a trained checkpoint under several attention patterns, no retraining.

    ratplus-eval --load checkpoints/ratplus-tiny --patterns dense,dilated:4,dilated:16,dilated:64
    ratplus-eval --load CKPT --patterns dense,dilated:16,w=256,p=4 --lm-eval-tasks piqa,hellaswag \\
        --retrieval --longbench hotpotqa,trec --longbench-dir LongBench/data --results ckpt.json
    ratplus-eval report ckpt_a.json ckpt_b.json --output report/

Prints validation perplexity per pattern (and its decode KV cache relative to dense); with the
sparse-inference flags it also writes the table (CSV/JSON), plots perplexity against D, runs
the RULER-style synthetic tasks and searches per-layer patterns for a KV budget. The benchmark
flags run lm-evaluation-harness tasks (one column per pattern) and LongBench-style tasks from
local files; --results writes every number to one JSON file, and ``ratplus-eval report`` puts
such files side by side (Markdown table and PNG plots). The validation split is the
checkpoint's own (embedded corpus or its --data-path) unless --data-path is given.
"""

from __future__ import annotations

import argparse
import os
import sys

from megatron_ratplus.checkpoint import CheckpointError
from megatron_ratplus.cli import run_cli
from megatron_ratplus.data.tokenizer import DataError
from megatron_ratplus.errors import UserError
from megatron_ratplus.optional import MissingDependency
from megatron_ratplus.patterns import PatternError


class EvalUsageError(ValueError):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise EvalUsageError(message)


def _names(text: str):
    return [name for name in text.split(",") if name]


def build_parser() -> argparse.ArgumentParser:
    from megatron_ratplus.evaluation import suite

    p = _Parser(prog="ratplus-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="checkpoint directory (a save dir or one iter_* dir)")
    p.add_argument("--patterns", default="dense,dilated:4,dilated:16,dilated:64",
                   help="comma-separated patterns or compositions, e.g. dense,dilated:16,w=256,p=4,local:w=64")
    p.add_argument("--eval-samples", type=int, default=64, help="validation windows to score")
    p.add_argument("--data-path", nargs="+", help="indexed dataset prefixes (default: the checkpoint's data)")
    suite.add_arguments(p)
    bench = p.add_argument_group("benchmarks")
    bench.add_argument("--lm-eval-tasks", type=_names, help="lm-evaluation-harness tasks, e.g. piqa,hellaswag")
    bench.add_argument("--lm-eval-include", help="folder of extra lm-eval task YAMLs (local data files)")
    bench.add_argument("--lm-eval-limit", type=float, help="documents per lm-eval task (a fraction if < 1)")
    bench.add_argument("--lm-eval-fewshot", type=int, help="few-shot examples per lm-eval prompt")
    bench.add_argument("--longbench", type=_names, help="LongBench tasks (or NAME:METRIC for other local data)")
    bench.add_argument("--longbench-dir", help="folder holding <task>.jsonl in LongBench's format")
    bench.add_argument("--longbench-samples", type=int, help="first N samples per LongBench task")
    bench.add_argument("--longbench-buckets", type=suite._int_list, default=[4000, 8000],
                       help="prompt-length bucket bounds in tokens (default 4000,8000)")
    bench.add_argument("--batch-size", type=int, default=8, help="requests per forward pass / decode batch")
    bench.add_argument("--results", help="write every result to this .json file (for ratplus-eval report)")
    bench.add_argument("--name", help="checkpoint name in the results file (default: the --load folder name)")
    return p


def build_report_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ratplus-eval report", description="results files side by side: report.md and PNG plots")
    p.add_argument("results", nargs="+", help="results .json files written by ratplus-eval --results")
    p.add_argument("--output", required=True, help="folder for report.md and the plots (created)")
    p.add_argument("--metric", action="append", default=[], metavar="TASK=METRIC",
                   help="metric shown for a task (default: acc, exact_match or string_match_all when present)")
    return p


def _check_benchmark_arguments(args) -> None:
    if args.longbench and not args.longbench_dir:
        raise EvalUsageError("--longbench needs --longbench-dir (the folder of LongBench's <task>.jsonl files)")
    if args.results and os.path.splitext(args.results)[1].lower() != ".json":
        raise EvalUsageError(f"--results '{args.results}' must end in .json")
    if args.results and not os.path.isdir(os.path.dirname(os.path.abspath(args.results))):
        raise EvalUsageError(f"--results '{args.results}': directory does not exist")
    if args.batch_size < 1:
        raise EvalUsageError("--batch-size must be >= 1")


def _benchmarks(model, tokenizer, args, patterns, out) -> dict:
    """lm-eval and LongBench-style rows for the flags given (printed as they finish)."""
    from megatron_ratplus.evaluation.report import format_table

    found = {}
    if args.lm_eval_tasks:
        from megatron_ratplus.optional import require

        require("lm_eval", "--lm-eval-tasks")
        from megatron_ratplus.evaluation.harness import lm_eval_rows, pattern_columns, task_manager

        found["lm_eval"] = lm_eval_rows(model, tokenizer, args.lm_eval_tasks, patterns,
                                        task_manager(args.lm_eval_include), args.lm_eval_limit,
                                        args.lm_eval_fewshot, args.batch_size)
        print(format_table(pattern_columns(found["lm_eval"])), file=out)
    if args.longbench:
        from megatron_ratplus.evaluation.longbench import longbench_table

        found["longbench"] = longbench_table(model, args.longbench, args.longbench_dir, patterns, tokenizer,
                                             args.longbench_samples, args.longbench_buckets, args.batch_size)
        print(format_table(found["longbench"]), file=out)
    return found


def evaluate(argv) -> dict:
    from megatron_ratplus.checkpoint import load_model, read_meta
    from megatron_ratplus.data import validation_windows
    from megatron_ratplus.evaluation import results as results_file
    from megatron_ratplus.evaluation import suite
    from megatron_ratplus.patterns import split_pattern_list

    args = build_parser().parse_args(argv)
    if args.eval_samples < 1:
        raise EvalUsageError("--eval-samples must be >= 1")
    try:
        suite.check_arguments(args)
    except ValueError as err:  # bad output paths, budgets or patterns
        raise EvalUsageError(str(err)) from None
    _check_benchmark_arguments(args)
    train_args = read_meta(args.load)["args"]
    model, config, tokenizer = load_model(args.load)
    tokens = validation_windows(tokenizer, config.seq_length, args.eval_samples,
                                args.data_path or train_args.get("data_path"),
                                train_args.get("seed", 1234), train_args.get("split", "98,2,0"))
    found = suite.run(model, tokens, args, tokenizer=tokenizer)
    found.update(_benchmarks(model, tokenizer, args, split_pattern_list(args.patterns), sys.stdout))
    if args.results:
        rows = (results_file.from_perplexity(found["perplexity"]) + results_file.from_ruler(found.get("retrieval", []))
                + found.get("lm_eval", []) + results_file.from_longbench(found.get("longbench", [])))
        results_file.write_results(args.results, args.name or os.path.basename(os.path.normpath(args.load)), rows)
    return found


def report(argv) -> list:
    from megatron_ratplus.evaluation.paper_report import write_report
    from megatron_ratplus.evaluation.results import read_results

    args = build_report_parser().parse_args(argv)
    overrides = {}
    for item in args.metric:
        task, sep, metric = item.partition("=")
        if not sep or not task or not metric:
            raise EvalUsageError(f"--metric expects TASK=METRIC, got '{item}'")
        overrides[task] = metric
    written = write_report([read_results(path) for path in args.results], args.output, overrides)
    for path in written:
        print(path)
    return written


def main(argv=None) -> int:
    argv = list(argv if argv is not None else sys.argv[1:])
    if argv[:1] == ["report"]:
        return run_cli("ratplus-eval", lambda: report(argv[1:]), (EvalUsageError, UserError))
    return run_cli("ratplus-eval", lambda: evaluate(argv),
                   (EvalUsageError, CheckpointError, DataError, PatternError, UserError, MissingDependency))


if __name__ == "__main__":
    sys.exit(main())
