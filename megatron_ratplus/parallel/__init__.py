"""The training side of parallelism on megatron-core: data-parallel wrapping for CPU and GPU,
the schedules, the CP batch slicer and the up-front layout check.

Tensor, sequence and pipeline parallelism are megatron-core's own (Column/RowParallelLinear,
the pipeline schedules); the context-parallel maths the mixer needs lives beside it in
``megatron_ratplus.layers.context_parallel``. The training side (``data_parallel.wrap_model``,
``schedule.forward_backward``) builds on the model, so it is imported from its submodules.
"""

from megatron_ratplus.parallel.layout import slice_batch_for_cp
from megatron_ratplus.parallel.validate import validate_parallel_config, virtual_pipeline_size

__all__ = ["slice_batch_for_cp", "validate_parallel_config", "virtual_pipeline_size"]
