"""Process-group set-up: torch.distributed plus megatron-core's parallel_state.

gloo on CPU, nccl on GPU. A single process without torchrun's environment gets a one-rank
group on a free local port, so tools and tests use the same code path as multi-rank runs.
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core import tensor_parallel as tensor_parallel_rng

from megatron_ratplus import cpu_compat


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def initialize(tensor_parallel: int = 1, pipeline_parallel: int = 1, context_parallel: int = 1,
               virtual_pipeline: int = None, seed: int = 1234) -> None:
    """Initialise torch.distributed (if needed), megatron's model-parallel groups and its
    model-parallel RNG tracker (sequence-parallel embeddings fork it)."""
    cpu_compat.install()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if "WORLD_SIZE" in os.environ:  # launched by torchrun / SLURM wrappers
            dist.init_process_group(backend=backend)
        else:  # a lone process: a private one-rank group (the environment is left alone for children)
            dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{_free_port()}",
                                    rank=0, world_size=1)
    if parallel_state.model_parallel_is_initialized():
        _destroy_model_parallel_groups()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        context_parallel_size=context_parallel,
        virtual_pipeline_model_parallel_size=virtual_pipeline,
    )
    tensor_parallel_rng.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)


def _destroy_model_parallel_groups() -> None:
    """Forget megatron's groups and destroy them, keeping the default group. megatron's
    ``destroy_model_parallel`` drops its references but destroys only a few gloo groups; the rest
    stay registered in torch, each with its own gloo threads and sockets, so every re-initialisation
    in one process (tools, tests) would leak them. torch has no public list of groups, hence the
    registry read here."""
    parallel_state.destroy_model_parallel()
    for group in list(dist.distributed_c10d._world.pg_map):
        if group is not dist.GroupMember.WORLD:
            dist.destroy_process_group(group)


def device() -> torch.device:
    """Where this rank's tensors live: its CUDA device (the one ``initialize`` selected), else the
    CPU. Every tensor a collective sees must be here: NCCL reduces CUDA tensors only, gloo CPU ones."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def to_device(batch: dict) -> dict:
    """``batch``'s tensors on :func:`device` (copied from pinned memory without blocking on CUDA)."""
    target = device()
    if target.type != "cuda":
        return {key: value.to(target) for key, value in batch.items()}
    return {key: (value.pin_memory() if value.device.type == "cpu" else value).to(target, non_blocking=True)
            for key, value in batch.items()}


def shutdown() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
