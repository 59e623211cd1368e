"""ratplus-eval: a trained checkpoint under several attention patterns, no retraining.

    ratplus-eval --load checkpoints/ratplus-tiny --patterns dense,dilated:4,dilated:16,dilated:64
    ratplus-eval --load CKPT --patterns dense,dilated:16,w=256,p=4 --lm-eval-tasks piqa,hellaswag \\
        --ruler-tasks niah_single_1,vt,cwe --ruler-lengths 4096,8192 --longbench hotpotqa,trec \\
        --longbench-dir LongBench/data --results ckpt.json
    ratplus-eval report ckpt_a.json ckpt_b.json --output report/

Prints validation perplexity per pattern (and its decode KV cache relative to dense); with the
sparse-inference flags it also writes the table (CSV/JSON), plots perplexity against D, runs
RULER's synthetic tasks and searches per-layer patterns for a KV budget. The benchmark
flags run lm-evaluation-harness tasks (one column per pattern) and LongBench-style tasks from
local files; --results writes every number to one JSON file, and ``ratplus-eval report`` puts
such files side by side (Markdown table and PNG plots). The validation split is the
checkpoint's own (embedded corpus or its --data-path) unless --data-path is given.
"""

from __future__ import annotations

import argparse
import os
import sys

from megatron_ratplus.cli import run_cli
from megatron_ratplus.cli.types import int_list, non_negative_int, positive_float, positive_int
from megatron_ratplus.data.datasets import DEFAULT_SEED, DEFAULT_SPLIT
from megatron_ratplus.errors import ArgumentParser, UserError
from megatron_ratplus.evaluation.ruler import DEFAULT_SEED as RULER_SEED
from megatron_ratplus.evaluation.ruler import RULER_LENGTHS, TASKS, check_tasks
from megatron_ratplus.evaluation.ruler_sources import RulerSources
from megatron_ratplus.evaluation.search import DEFAULT_CANDIDATES
from megatron_ratplus.patterns import split_pattern_list
from megatron_ratplus.userfiles import check_output_path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The sparse-inference flags (evaluation/suite.py's arguments)."""
    group = parser.add_argument_group("sparse inference")
    group.add_argument("--table", help="write the perplexity table to this .csv or .json file")
    group.add_argument("--plot", help="write perplexity against D (with and without a window) to this .png")
    group.add_argument("--ruler-tasks", type=_ruler_tasks, metavar="TASK,...",
                       help="RULER tasks per pattern and length ('all': " + ", ".join(TASKS) + ")")
    group.add_argument("--ruler-lengths", type=int_list,
                       help="RULER lengths in model tokens, prompt + answer budget (default: %s up to the model's "
                            "maximum)" % ",".join(map(str, RULER_LENGTHS)))
    group.add_argument("--ruler-samples", type=positive_int, default=500, help="samples per RULER task and length (RULER: 500)")
    group.add_argument("--ruler-seed", type=non_negative_int, default=RULER_SEED, help="RULER's random seed (default 42)")
    group.add_argument("--ruler-essay", help="essay haystack: RULER's PaulGrahamEssays.json ({\"text\": ...})")
    group.add_argument("--ruler-qa-squad", help="qa_1's data: SQuAD 2.0 dev-v2.0.json")
    group.add_argument("--ruler-qa-hotpot", help="qa_2's data: HotpotQA hotpot_dev_distractor_v1.json")
    group.add_argument("--ruler-table", help="write the RULER scores (per task, length, pattern) to this .csv or .json")
    group.add_argument("--search-budget", type=positive_float, default=None,
                       help="choose per-layer patterns for a KV-cache budget: a fraction of dense (<= 1) or bytes")
    group.add_argument("--search-candidates", default=",".join(DEFAULT_CANDIDATES),
                       help="candidate patterns for the search (comma-separated)")


def _ruler_tasks(text: str):
    names = list(TASKS) if text == "all" else [name for name in text.split(",") if name]
    unknown = [name for name in names if name not in TASKS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown RULER task '{unknown[0] if unknown else text}' "
                                         f"(choose from all, {', '.join(TASKS)})")
    return names


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="ratplus-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="checkpoint directory (a save dir or one iter_* dir)")
    p.add_argument("--patterns", default="dense,dilated:4,dilated:16,dilated:64",
                   help="comma-separated patterns or compositions, e.g. dense,dilated:16,w=256,p=4,local:w=64")
    p.add_argument("--eval-samples", type=positive_int, default=64, help="validation windows to score")
    p.add_argument("--data-path", nargs="+", help="indexed dataset prefixes (default: the checkpoint's data)")
    p.add_argument("--bf16", action="store_true", help="bf16 parameters and activations (as ratplus-pretrain's "
                                                       "--bf16; default fp32); logits are scored in fp32")
    add_arguments(p)
    add_benchmark_arguments(p)
    return p


def _names(text: str):
    return [name for name in text.split(",") if name]


def add_benchmark_arguments(parser: argparse.ArgumentParser) -> None:
    """lm-evaluation-harness, LongBench-style and results-file flags."""
    bench = parser.add_argument_group("benchmarks")
    bench.add_argument("--lm-eval-tasks", type=_names, help="lm-evaluation-harness tasks, e.g. piqa,hellaswag")
    bench.add_argument("--lm-eval-include", help="folder of extra lm-eval task YAMLs (local data files)")
    bench.add_argument("--lm-eval-limit", type=positive_float, help="documents per lm-eval task (a fraction if < 1)")
    bench.add_argument("--lm-eval-fewshot", type=non_negative_int, help="few-shot examples per lm-eval prompt")
    bench.add_argument("--longbench", type=_names, help="LongBench tasks (or NAME:METRIC for other local data)")
    bench.add_argument("--longbench-dir", help="folder holding <task>.jsonl in LongBench's format")
    bench.add_argument("--longbench-samples", type=positive_int, help="first N samples per LongBench task")
    bench.add_argument("--longbench-buckets", type=int_list, default=[4000, 8000],
                       help="LongBench-E bucket bounds on the data's length field, in words (default 4000,8000)")
    bench.add_argument("--longbench-max-length", type=positive_int,
                       help="LongBench truncation budget in tokens (default: the model's context minus 500)")
    bench.add_argument("--batch-size", type=positive_int, default=8, help="requests per forward pass / decode batch")
    bench.add_argument("--results", help="write every result to this .json file (for ratplus-eval report)")
    bench.add_argument("--name", help="checkpoint name in the results file (default: the --load folder name)")


def build_report_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="ratplus-eval report", description="results files side by side: report.md and PNG plots")
    p.add_argument("results", nargs="+", help="results .json files written by ratplus-eval --results")
    p.add_argument("--output", required=True, help="folder for report.md and the plots (created)")
    p.add_argument("--metric", action="append", default=[], metavar="TASK=METRIC",
                   help="metric shown for a task (default: acc, exact_match or string_match_all when present)")
    return p


def check_arguments(args) -> None:
    """Fail before any evaluation runs on a bad output path or setting (UserError, one line)."""
    for flag, path, exts in (("--table", args.table, (".csv", ".json")), ("--plot", args.plot, (".png",)),
                             ("--ruler-table", args.ruler_table, (".csv", ".json"))):
        if path is None:
            continue
        if os.path.splitext(path)[1].lower() not in exts:
            raise UserError(f"{flag} '{path}' must end in {' or '.join(exts)}")
        if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise UserError(f"{flag} '{path}': directory does not exist")
        check_output_path(flag, path)
    if args.ruler_tasks:
        check_tasks(args.ruler_tasks, ruler_sources(args))
    split_pattern_list(args.patterns)
    split_pattern_list(args.search_candidates)
    if getattr(args, "longbench", None) and not args.longbench_dir:
        raise UserError("--longbench needs --longbench-dir (the folder of LongBench's <task>.jsonl files)")
    buckets = getattr(args, "longbench_buckets", [1])
    if min(buckets) < 1 or sorted(set(buckets)) != buckets:
        raise UserError(f"--longbench-buckets must be increasing positive bounds, got {buckets}")
    budget = getattr(args, "longbench_max_length", None)
    if budget is not None and budget < 2:
        raise UserError(f"--longbench-max-length must be >= 2, got {budget}")
    if getattr(args, "longbench", None):  # a bad task name or data file, before the model loads and evaluates
        from megatron_ratplus.evaluation.longbench import load_samples, task_spec

        for name in args.longbench:
            load_samples(args.longbench_dir, task_spec(name), args.longbench_samples)
    results = getattr(args, "results", None)
    if results and os.path.splitext(results)[1].lower() != ".json":
        raise UserError(f"--results '{results}' must end in .json")
    if results and not os.path.isdir(os.path.dirname(os.path.abspath(results))):
        raise UserError(f"--results '{results}': directory does not exist")
    if results:
        check_output_path("--results", results)


def ruler_sources(args) -> RulerSources:
    return RulerSources(args.ruler_essay, args.ruler_qa_squad, args.ruler_qa_hotpot)


def run_suite(model, tokens, args, tokenizer=None, out=None) -> dict:
    """Check the sparse-inference flags, then run evaluation/suite.py with their values."""
    from megatron_ratplus.evaluation import suite

    check_arguments(args)
    return suite.run(model, tokens, split_pattern_list(args.patterns), table=args.table, plot=args.plot,
                     ruler=args.ruler_tasks, ruler_lengths=args.ruler_lengths, ruler_samples=args.ruler_samples,
                     ruler_sources=ruler_sources(args), ruler_seed=args.ruler_seed, ruler_table_path=args.ruler_table,
                     batch_size=getattr(args, "batch_size", 4),
                     search_budget=args.search_budget, search_candidates=split_pattern_list(args.search_candidates),
                     tokenizer=tokenizer, out=out)


def run_benchmarks(model, tokenizer, args, out=None) -> dict:
    """lm-eval and LongBench-style rows for the flags given (printed as they finish)."""
    from megatron_ratplus.evaluation.report import format_table

    out = out or sys.stdout
    patterns = split_pattern_list(args.patterns)
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
        from megatron_ratplus.evaluation.longbench import longbench_report, longbench_table

        found["longbench"] = longbench_table(model, args.longbench, args.longbench_dir, patterns, tokenizer,
                                             args.longbench_samples, args.longbench_buckets, args.batch_size,
                                             args.longbench_max_length)
        print(format_table(longbench_report(found["longbench"])), file=out)
    return found


def write_results_file(args, found: dict) -> None:
    from megatron_ratplus.evaluation import results as results_file

    rows = (results_file.from_perplexity(found["perplexity"]) + results_file.from_ruler(found.get("ruler", []))
            + found.get("lm_eval", []) + results_file.from_longbench(found.get("longbench", [])))
    results_file.write_results(args.results, args.name or os.path.basename(os.path.normpath(args.load)), rows)


def evaluate(argv) -> dict:
    from megatron_ratplus.checkpoint import load_model, read_meta
    from megatron_ratplus.data import validation_windows

    args = build_parser().parse_args(argv)
    check_arguments(args)
    train_args = read_meta(args.load)["args"]
    model, config, tokenizer = load_model(args.load, dtype="bf16" if args.bf16 else "fp32")
    tokens = validation_windows(tokenizer, config.seq_length, args.eval_samples,
                                args.data_path or train_args.get("data_path"),
                                train_args.get("seed", DEFAULT_SEED), train_args.get("split", DEFAULT_SPLIT))
    found = run_suite(model, tokens, args, tokenizer=tokenizer)
    found.update(run_benchmarks(model, tokenizer, args))
    if args.results:
        write_results_file(args, found)
    return found


def report(argv) -> list:
    from megatron_ratplus.evaluation.paper_report import write_report
    from megatron_ratplus.evaluation.results import read_results

    args = build_report_parser().parse_args(argv)
    overrides = {}
    for item in args.metric:
        task, sep, metric = item.partition("=")
        if not sep or not task or not metric:
            raise UserError(f"--metric expects TASK=METRIC, got '{item}'")
        overrides[task] = metric
    written = write_report([read_results(path) for path in args.results], args.output, overrides)
    for path in written:
        print(path)
    return written


def main(argv=None) -> int:
    argv = list(argv if argv is not None else sys.argv[1:])
    if argv[:1] == ["report"]:
        return run_cli("ratplus-eval", lambda: report(argv[1:]))
    return run_cli("ratplus-eval", lambda: evaluate(argv))


if __name__ == "__main__":
    sys.exit(main())
