"""Context parallelism for the RAT+ mixer: the recurrence by state passing, attention over the
exchanged public tokens, and megatron's load-balanced CP layout.

Tensor, sequence and pipeline parallelism are megatron-core's own (Column/RowParallelLinear,
the pipeline schedules). The training runtime (schedule, data parallelism, the layout check)
lives in megatron_ratplus.training.
"""

from megatron_ratplus.parallel.cp_attention import cp_pattern_attention
from megatron_ratplus.parallel.cp_scan import cp_gated_scan
from megatron_ratplus.parallel.layout import context_parallel_group

__all__ = ["cp_gated_scan", "cp_pattern_attention", "context_parallel_group"]
