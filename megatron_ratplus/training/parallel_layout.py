"""Up-front check of a parallel layout, so a bad combination fails before any group is built."""

from __future__ import annotations

from typing import Optional

from megatron_ratplus.errors import UserError


def virtual_pipeline_size(num_layers: int, pp: int, layers_per_virtual_stage: Optional[int]) -> Optional[int]:
    """Virtual stages per pipeline rank from megatron's --num-layers-per-virtual-pipeline-stage."""
    if layers_per_virtual_stage is None:
        return None
    if layers_per_virtual_stage < 1 or pp < 2 or num_layers % pp or (num_layers // pp) % layers_per_virtual_stage:
        raise UserError(f"layers per virtual pipeline stage ({layers_per_virtual_stage}) must divide the "
                         f"layers per pipeline stage ({num_layers} layers / {pp} stages), with at least 2 stages")
    return num_layers // pp // layers_per_virtual_stage


def validate_parallel_config(world_size: int, tp: int = 1, pp: int = 1, cp: int = 1, vpp: Optional[int] = None,
                             num_layers: int = 1, num_heads: int = 1, seq_length: int = 2,
                             sequence_parallel: bool = False) -> int:
    """Raise UserError (one line) for a layout megatron-ratplus cannot run; return the DP size.

    vpp is the number of virtual pipeline stages per rank (None or 1: no interleaving; see
    :func:`virtual_pipeline_size` for megatron's layers-per-virtual-stage flag).
    """
    for name, value in (("tensor-parallel", tp), ("pipeline-parallel", pp), ("context-parallel", cp),
                        ("world", world_size)):
        if not isinstance(value, int) or value < 1:
            raise UserError(f"{name} size must be a positive integer, got {value!r}")
    if sequence_parallel and tp < 2:
        raise UserError("sequence parallelism needs a tensor-parallel size of at least 2")
    model_parallel = tp * pp * cp
    if world_size % model_parallel:
        raise UserError(f"world size {world_size} is not a multiple of tensor x pipeline x context parallel "
                         f"sizes {tp} x {pp} x {cp} = {model_parallel}")
    if num_heads % tp:
        raise UserError(f"number of attention heads ({num_heads}) is not divisible by the tensor-parallel "
                         f"size ({tp})")
    stages = pp * (vpp or 1)
    if vpp is not None and vpp > 1 and pp < 2:
        raise UserError(f"virtual pipeline stages ({vpp}) need a pipeline-parallel size of at least 2")
    if num_layers % stages:
        what = f"pipeline stages ({pp})" if not vpp or vpp == 1 else \
            f"pipeline stages x virtual stages ({pp} x {vpp} = {stages})"
        raise UserError(f"number of layers ({num_layers}) is not divisible by the {what}")
    if seq_length % (2 * cp):
        raise UserError(f"sequence length ({seq_length}) is not divisible by 2 x context-parallel size "
                         f"({2 * cp}): each context-parallel rank holds two equal slices")
    return world_size // model_parallel
