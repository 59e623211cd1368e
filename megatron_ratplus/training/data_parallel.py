"""Data parallelism with one interface on GPU and CPU.

GPU: megatron-core's DistributedDataParallel (bucketed, overlappable gradient reduction into
fp32 ``main_grad`` buffers; with ``use_distributed_optimizer`` it reduce-scatters for megatron's
distributed optimizer), also on CPU with the distributed optimizer (through cpu_compat). CPU
otherwise: ``param.grad`` for a torch optimizer, reduced with one all-reduce per chunk. Both average
over the data x context parallel group, the convention megatron's schedules assume (they scale
the loss by the CP size), and both are finished by megatron's own ``finalize_model_grads``,
which also sums sequence-parallel norm gradients over TP and tied-embedding gradients over the
first and last pipeline stages.
"""

from __future__ import annotations

import contextlib
from typing import List, Optional, Sequence, Union

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer.clip_grads import get_grad_norm_fp32
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
from megatron.core.transformer.module import Float16Module, MegatronModule, param_is_not_shared

__all__ = ["uses_megatron_optimizer", "wrap_model", "zero_grads", "clip_grad_norm", "params_gathered", "CPUDataParallel"]


def uses_megatron_optimizer(use_distributed_optimizer: bool) -> bool:
    """megatron's DDP and optimizer on GPUs, and on CPU for the distributed optimizer (megatron's
    own, through megatron_ratplus/cpu_compat.py); CPUDataParallel with the AdamW path otherwise."""
    return torch.cuda.is_available() or use_distributed_optimizer


class CPUDataParallel(MegatronModule):
    """The part of megatron's DDP surface that its schedules and finalize_model_grads use, on ``.grad``.

    Written by hand because megatron's DDP and torch's DDP both fall short on CPU: megatron's
    optimizer needs CUDA, and torch's DDP reduces during backward, which the pipeline schedules
    (several backward passes per step) must not trigger.
    """

    def __init__(self, config, module: torch.nn.Module):
        super().__init__(config=config)
        self.module = module
        self.ddp_config = DistributedDataParallelConfig()
        self.group = parallel_state.get_data_parallel_group(with_context_parallel=True)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def no_sync(self):
        return contextlib.nullcontext()

    def finish_grad_sync(self, force_all_reduce: bool = False):
        """Average gradients over data x context parallel ranks (one flat all-reduce, in fp32 as
        megatron's ``grad_reduce_in_fp32`` does for bf16 parameters)."""
        grads = [p.grad for p in self.module.parameters() if p.requires_grad and p.grad is not None]
        if not grads or self.group.size() == 1:
            return
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        dist.all_reduce(flat, group=self.group)
        flat /= self.group.size()
        offset = 0
        for grad in grads:
            grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
            offset += grad.numel()

    def scale_gradients(self, scaling: float):
        for param in self.module.parameters():
            if param.grad is not None:
                param.grad.mul_(scaling)

    def zero_grad_buffer(self):
        self.module.zero_grad(set_to_none=True)

    def sharded_state_dict(self, *args, **kwargs):
        return self.module.sharded_state_dict(*args, **kwargs)

    def state_dict(self, *args, **kwargs):
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, *args, **kwargs):
        return self.module.load_state_dict(*args, **kwargs)


def wrap_model(model: Union[torch.nn.Module, Sequence[torch.nn.Module]], config,
               use_distributed_optimizer: bool = False, overlap_grad_reduce: bool = False,
               overlap_param_gather: bool = False) -> List[torch.nn.Module]:
    """Wrap each model chunk (one per virtual pipeline stage) for mixed precision and data
    parallelism, in Megatron-LM's order: megatron's Float16Module when ``config.bf16`` (bf16
    parameters and compute, fp32 logits out of the last stage), then the data-parallel wrapper.

    GPU, and CPU with the distributed optimizer (:func:`uses_megatron_optimizer`): megatron DDP,
    gradients accumulated and reduced in fp32 (pass the same ``use_distributed_optimizer`` to
    megatron's OptimizerConfig). Otherwise :class:`CPUDataParallel` (training/config.py refuses
    the overlap flags on CPU).
    """
    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    if config.bf16:
        chunks = [Float16Module(config, chunk) for chunk in chunks]
    if uses_megatron_optimizer(use_distributed_optimizer):
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=overlap_grad_reduce,
            overlap_param_gather=overlap_param_gather, use_distributed_optimizer=use_distributed_optimizer,
            fp8_param_gather=bool(config.fp8_param))
        wrapped = [DistributedDataParallel(config, ddp_config, chunk, disable_bucketing=i > 0)
                   for i, chunk in enumerate(chunks)]
    else:
        wrapped = [CPUDataParallel(config, chunk) for chunk in chunks]
    return wrapped


@contextlib.contextmanager
def params_gathered(wrapped: Sequence[torch.nn.Module], overlap_param_gather: bool):
    """With --overlap-param-gather, megatron's DDP gathers updated parameters in forward pre-hooks;
    outside training steps (evaluation, checkpointing) Megatron-LM turns the hooks off, which
    finishes the pending all-gathers, and back on after."""
    if overlap_param_gather:
        for chunk in wrapped:
            chunk.disable_forward_pre_hook()
    try:
        yield
    finally:
        if overlap_param_gather:
            for chunk in wrapped:
                chunk.enable_forward_pre_hook()


def zero_grads(wrapped: Sequence[torch.nn.Module]) -> None:
    """Clear gradients before a step (megatron's grad buffers on GPU, ``.grad`` on CPU)."""
    for chunk in wrapped:
        chunk.zero_grad_buffer()


def clip_grad_norm(wrapped: Sequence[torch.nn.Module], max_norm: float,
                   grads: Optional[List[torch.Tensor]] = None) -> float:
    """Clip ``.grad`` by the norm of the whole (unsharded) model's gradient; returns that norm.

    For the CPU path (megatron's optimizer clips on GPU): torch's clip_grad_norm_ would count
    only this rank's shards, and count replicated norms and the tied output weight twice. Each
    gradient is counted once (megatron's duplicate/shared tests), summed over the model-parallel
    group by megatron's get_grad_norm_fp32. ``grads``: the gradients to scale when they are not
    the parameters' own (the optimizer's fp32 copies of bf16 gradients); the norm is the same.
    """
    params = [p for chunk in wrapped for p in chunk.parameters() if p.grad is not None]
    counted = [p.grad for p in params if param_is_not_shared(p) and param_is_not_tensor_parallel_duplicate(p)]
    norm = get_grad_norm_fp32(counted, grad_stats_parallel_group=parallel_state.get_model_parallel_group())
    if norm > max_norm:
        for grad in grads if grads is not None else [p.grad for p in params]:
            grad.mul_(max_norm / (norm + 1e-6))
    return norm
