"""Evaluation: perplexity per pattern, RULER's synthetic tasks, a LongBench-style runner,
lm-evaluation-harness tasks (the ``ratplus`` model, optional extra ``[eval]``), pattern search,
results files and paper-style reports.

Library functions take a model (and tokenizer), so ``ratplus-eval`` and scripts share them;
the lm-eval pieces (``harness``, ``lm_eval_model``) import lm-eval and are imported on use.
"""

from megatron_ratplus.evaluation.perplexity import PerplexityRow, cache_fraction, mean_loss, perplexity_table
from megatron_ratplus.evaluation.report import format_table, plot_perplexity_vs_dilation, write_table
from megatron_ratplus.evaluation.ruler import RulerSample, make_samples, ruler_summary, ruler_table
from megatron_ratplus.evaluation.search import BudgetError, SearchResult, choose, layer_sensitivities, search_patterns

__all__ = ["BudgetError", "PerplexityRow", "RulerSample", "SearchResult", "cache_fraction",
           "choose", "format_table", "layer_sensitivities", "make_samples", "mean_loss", "perplexity_table",
           "plot_perplexity_vs_dilation", "ruler_summary", "ruler_table", "search_patterns", "write_table"]
