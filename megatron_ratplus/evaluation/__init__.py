"""Sparse-inference evaluation: perplexity per pattern, synthetic retrieval, pattern search.

Library functions take a model and token tensors, so ``ratplus-eval`` and scripts share them.
"""

from megatron_ratplus.evaluation.perplexity import PerplexityRow, cache_fraction, mean_loss, perplexity_table
from megatron_ratplus.evaluation.report import format_table, plot_perplexity_vs_dilation, write_table
from megatron_ratplus.evaluation.retrieval import (RetrievalSample, make_samples, retrieval_accuracy,
                                                   retrieval_table)
from megatron_ratplus.evaluation.search import BudgetError, SearchResult, choose, layer_sensitivities, search_patterns

__all__ = ["BudgetError", "PerplexityRow", "RetrievalSample", "SearchResult", "cache_fraction",
           "choose", "format_table", "layer_sensitivities", "make_samples", "mean_loss", "perplexity_table",
           "plot_perplexity_vs_dilation", "retrieval_accuracy", "retrieval_table", "search_patterns",
           "write_table"]
