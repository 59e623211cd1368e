"""Parallelism on megatron-core: context parallelism by state passing, the load-balanced CP
layout, data-parallel wrapping for CPU and GPU, and the up-front layout check.

Tensor, sequence and pipeline parallelism are megatron-core's own (Column/RowParallelLinear,
the pipeline schedules); the pieces here are what RAT+ or a CPU run adds to them. The training
side (``data_parallel.wrap_model``, ``schedule.forward_backward``) builds on the model, so it
is imported from its submodules, not from here (the mixer imports this package).
"""

from megatron_ratplus.parallel.cp_attention import cp_pattern_attention
from megatron_ratplus.parallel.cp_scan import cp_gated_scan
from megatron_ratplus.parallel.layout import context_parallel_group, slice_batch_for_cp
from megatron_ratplus.parallel.validate import validate_parallel_config, virtual_pipeline_size

__all__ = ["cp_gated_scan", "cp_pattern_attention", "context_parallel_group",
           "slice_batch_for_cp", "validate_parallel_config", "virtual_pipeline_size"]
