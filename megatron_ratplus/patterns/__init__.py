"""Attention patterns (docs/DESIGN.md §2): one pattern and its visibility rule (``pattern``),
and the per-layer / per-head compositions of several (``composition``)."""

from megatron_ratplus.patterns.composition import (LayerPatterns, PatternComposition, head_runs, parse_composition,
                                                   split_pattern_list)
from megatron_ratplus.patterns.pattern import (KINDS, AttentionPattern, PatternError, allowed_mask, may_be_seen,
                                               parse_pattern, visible)

__all__ = ["AttentionPattern", "PatternError", "parse_pattern", "allowed_mask", "visible", "may_be_seen", "KINDS",
           "LayerPatterns", "PatternComposition", "parse_composition", "head_runs", "split_pattern_list"]
