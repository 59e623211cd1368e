"""Context parallelism for the RAT+ mixer (docs/DESIGN.md §4), kept beside it as megatron-core
keeps its Mamba mixer's: the load-balanced chunk layout, the state-passing scan and the
public-token attention exchange."""

from megatron_ratplus.layers.context_parallel.attention import cp_pattern_attention
from megatron_ratplus.layers.context_parallel.layout import chunk_ids, chunk_owner, context_parallel_group
from megatron_ratplus.layers.context_parallel.scan import cp_gated_scan, cp_shared_gate_scan

__all__ = ["cp_pattern_attention", "cp_gated_scan", "cp_shared_gate_scan", "context_parallel_group", "chunk_ids",
           "chunk_owner"]
