"""The sparse-inference evaluation ``ratplus-eval`` runs, as one function of plain values.

:func:`run` prints the perplexity table for the patterns and, as asked, writes it (CSV/JSON),
plots it (PNG), runs RULER's synthetic tasks and the pattern search. The flags that fill
its arguments are cli/eval.py's.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from megatron_ratplus.evaluation.errors import ContextLengthError
from megatron_ratplus.evaluation.perplexity import perplexity_table
from megatron_ratplus.evaluation.report import format_table, plot_perplexity_vs_dilation, write_table
from megatron_ratplus.evaluation.ruler import DEFAULT_SEED, RULER_LENGTHS, check_lengths, ruler_summary, ruler_table
from megatron_ratplus.evaluation.ruler_sources import RulerSources
from megatron_ratplus.evaluation.search import DEFAULT_CANDIDATES, search_patterns

PPL_COLUMNS = ("pattern", "loss", "perplexity", "cache_fraction")


def run(model, tokens, patterns: Sequence[str], table: Optional[str] = None, plot: Optional[str] = None,
        ruler: Optional[Sequence[str]] = None, ruler_lengths: Optional[Sequence[int]] = None,
        ruler_samples: int = 500, ruler_sources: Optional[RulerSources] = None, ruler_seed: int = DEFAULT_SEED,
        ruler_table_path: Optional[str] = None, batch_size: int = 4, search_budget: Optional[float] = None,
        search_candidates: Sequence[str] = DEFAULT_CANDIDATES, tokenizer=None, out=None) -> dict:
    """Perplexity per pattern, then what is asked: ``ruler`` (RULER task names at
    ``ruler_lengths``, default RULER's lengths up to the model's) and ``search_budget`` (a
    fraction of the dense KV cache if <= 1, else bytes).

    Returns {"perplexity": rows, "ruler": rows, "search": result} (the parts that ran).
    """
    out = out or sys.stdout
    if ruler:  # the lengths are checked before any evaluation runs
        ruler_lengths = ruler_lengths or default_lengths(model.config.seq_length)
        check_lengths(ruler_lengths, model.config.seq_length)
    results = {"perplexity": perplexity_table(model, tokens, patterns)}
    print(format_table(results["perplexity"], PPL_COLUMNS), file=out)
    if table:
        write_table(results["perplexity"], table)
    if plot:
        plot_perplexity_vs_dilation(results["perplexity"], plot)
    if ruler:
        results["ruler"] = ruler_table(model, patterns, ruler, ruler_lengths, ruler_samples, tokenizer, ruler_sources,
                                       ruler_seed, batch_size)
        print(format_table(ruler_summary(results["ruler"])), file=out)
        if ruler_table_path:
            write_table(results["ruler"], ruler_table_path)
    if search_budget is not None:
        budget = dict(budget_fraction=search_budget) if search_budget <= 1 else dict(budget_bytes=int(search_budget))
        results["search"] = search_patterns(model, tokens, candidates=search_candidates, **budget)
        print(results["search"].summary(), file=out)
    return results


def default_lengths(max_length: int) -> list:
    """RULER's lengths (4K to 128K) that the model's maximum length holds."""
    lengths = [n for n in RULER_LENGTHS if n <= max_length]
    if not lengths:
        raise ContextLengthError(f"none of RULER's lengths ({RULER_LENGTHS[0]} and up) fits the model's maximum "
                                 f"length of {max_length}: pass --ruler-lengths")
    return lengths
