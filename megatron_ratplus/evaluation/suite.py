"""The sparse-inference evaluation ``ratplus-eval`` runs, as one function of plain values.

:func:`run` prints the perplexity table for the patterns and, as asked, writes it (CSV/JSON),
plots it (PNG), runs the synthetic retrieval tasks and the pattern search. The flags that fill
its arguments are cli/eval.py's.
"""

from __future__ import annotations

import sys
from typing import Callable, Optional, Sequence

from megatron_ratplus.evaluation.perplexity import perplexity_table
from megatron_ratplus.evaluation.report import format_table, plot_perplexity_vs_dilation, write_table
from megatron_ratplus.evaluation.retrieval import BYTE_ENCODE, TASKS, retrieval_table
from megatron_ratplus.evaluation.search import DEFAULT_CANDIDATES, search_patterns

PPL_COLUMNS = ("pattern", "loss", "perplexity", "cache_fraction")
RETRIEVAL_LENGTHS = (256, 512, 1024)


def run(model, tokens, patterns: Sequence[str], table: Optional[str] = None, plot: Optional[str] = None,
        retrieval: Optional[Sequence[str]] = None, retrieval_lengths: Sequence[int] = RETRIEVAL_LENGTHS,
        retrieval_samples: int = 8, retrieval_table_path: Optional[str] = None,
        search_budget: Optional[float] = None, search_candidates: Sequence[str] = DEFAULT_CANDIDATES,
        encode: Callable = BYTE_ENCODE, out=None) -> dict:
    """Perplexity per pattern, then what is asked: ``retrieval`` (task names; empty: all tasks)
    and ``search_budget`` (a fraction of the dense KV cache if <= 1, else bytes).

    Returns {"perplexity": rows, "retrieval": rows, "search": result} (the parts that ran).
    """
    out = out or sys.stdout
    results = {"perplexity": perplexity_table(model, tokens, patterns)}
    print(format_table(results["perplexity"], PPL_COLUMNS), file=out)
    if table:
        write_table(results["perplexity"], table)
    if plot:
        plot_perplexity_vs_dilation(results["perplexity"], plot)
    if retrieval is not None:
        results["retrieval"] = retrieval_table(model, patterns, retrieval_lengths, retrieval or TASKS,
                                               retrieval_samples, encode=encode)
        print(format_table(results["retrieval"]), file=out)
        if retrieval_table_path:
            write_table(results["retrieval"], retrieval_table_path)
    if search_budget is not None:
        budget = dict(budget_fraction=search_budget) if search_budget <= 1 else dict(budget_bytes=int(search_budget))
        results["search"] = search_patterns(model, tokens, candidates=search_candidates, **budget)
        print(results["search"].summary(), file=out)
    return results
