"""Plan a run before launching it: parameters, FLOPs, memory per GPU, iterations, time.

Memory per GPU for a TP/PP/CP/DP layout and micro-batch (docs/DESIGN.md §7, §8):

- weights, gradients and optimizer states per parameter: bf16 training keeps bf16 weights (2 B),
  fp32 gradient buffers (4 B, megatron DDP with grad_reduce_in_fp32) and fp32 master weights
  + Adam moments (12 B), the last sharded over DP by the distributed optimizer; fp32 training
  keeps 4 + 4 + 8 B. The heaviest pipeline stage is counted (the first, with the embedding; the
  last holds a copy of the tied embedding as output layer).
- activations saved for the backward, per token and layer, on the kernel path (Triton scan and
  attention save their inputs and outputs, docs/DESIGN.md §3): the two RMSNorms keep input,
  normalised product and output (6d), the mixer keeps sigmoid(o), gate logits, k, v, k~, v~,
  the rotated q and k~, the attention output and the gated product (10d), the MLP keeps fc1's
  output and GELU's (2 ffn): 16d + 2 ffn elements (48d bytes in bf16 at ffn = 4d). The pattern
  does not change what is saved. Tensor parallelism divides all of it with sequence
  parallelism, only the mixer and MLP part without; context parallelism divides the tokens.
  1F1B keeps min(PP, micro-batches) micro-batches in flight on the first stage. Full
  recomputation keeps only each layer's input plus one layer's activations.
- logits on the last stage: megatron's cross entropy keeps fp32 softmax (4 B per vocabulary
  entry of the rank's shard) while the bf16 logits (2 B) still exist.
- a fixed allowance (CUDA context, NCCL buffers, allocator fragmentation), ``overhead_gb``.

With PP > 1 the first stage's activations and the last stage's logits are added on one GPU: an
upper bound. Interleaved (virtual) pipeline stages and partial recomputation are not modelled.

FLOPs come from :mod:`megatron_ratplus.flops`; time from a stated MFU and peak throughput.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

from megatron_ratplus.errors import UserError
from megatron_ratplus.flops import iteration_flops

GB = 1e9


@dataclass(frozen=True)
class Layout:
    """Parallel layout: GPUs = tensor x pipeline x context x data."""

    tensor: int = 1
    pipeline: int = 1
    context: int = 1
    data: int = 1
    sequence_parallel: bool = False
    distributed_optimizer: bool = False

    @property
    def gpus(self) -> int:
        return self.tensor * self.pipeline * self.context * self.data

    def __str__(self) -> str:
        extra = "".join([" +SP" if self.sequence_parallel else "", " +distopt" if self.distributed_optimizer else ""])
        return f"TP {self.tensor} x PP {self.pipeline} x CP {self.context} x DP {self.data} = {self.gpus} GPUs{extra}"


def parameters(config) -> Dict[str, int]:
    """Parameter counts: ``per_layer`` (mixer, MLP, two norms), ``fixed`` (tied embedding + final
    norm) and ``total``; equal to the built model (megatron_ratplus.model.build_model)."""
    d = config.hidden_size
    width = (config.kv_channels or d // config.num_attention_heads) * config.num_attention_heads
    parts = 5 if config.recurrence else 4
    per_layer = parts * width * d + width * d + 2 * d * config.ffn_hidden_size + 2 * d
    fixed = config.vocab_size * d + d
    return {"per_layer": per_layer, "fixed": fixed, "total": fixed + config.num_layers * per_layer}


def parameters_per_gpu(config, layout: Layout) -> float:
    """Parameters on the heaviest rank: its pipeline stage's layers (and embedding), over TP."""
    d = config.hidden_size
    norms = 2 * d  # replicated on every TP rank
    layers = math.ceil(config.num_layers / layout.pipeline)
    sharded = layers * (parameters(config)["per_layer"] - norms) + config.vocab_size * d
    return sharded / layout.tensor + layers * norms + d


def activation_elements_per_token(config) -> Tuple[int, int]:
    """Saved elements per token and layer: (outside the TP region: norms, inside: mixer + MLP)."""
    d = config.hidden_size
    return 6 * d, 10 * d + 2 * config.ffn_hidden_size


@dataclass
class Memory:
    """Bytes per GPU by kind."""

    weights: float
    gradients: float
    optimizer: float
    activations: float
    logits: float
    overhead: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.logits + self.overhead


def memory_per_gpu(config, layout: Layout, micro_batch: int, seq_length: int, num_microbatches: int = 1,
                   bf16: bool = True, recompute: bool = False, overhead_gb: float = 4.0) -> Memory:
    """Peak memory of one GPU of ``layout`` (see the module docstring for what is counted)."""
    params = parameters_per_gpu(config, layout)
    if bf16:
        weights, grads, states = 2 * params, 4 * params, 12 * params
    else:
        weights, grads, states = 4 * params, 4 * params, 8 * params
    if layout.distributed_optimizer:
        states /= layout.data

    act_bytes = 2 if bf16 else 4
    tokens = micro_batch * seq_length / layout.context
    outside, inside = activation_elements_per_token(config)
    per_layer = tokens * act_bytes * (inside / layout.tensor
                                      + outside / (layout.tensor if layout.sequence_parallel else 1))
    layers = math.ceil(config.num_layers / layout.pipeline)
    in_flight = min(layout.pipeline, num_microbatches)
    if recompute:  # each layer's input (sharded with SP) plus one layer recomputed in the backward
        layer_input = tokens * act_bytes * config.hidden_size / (layout.tensor if layout.sequence_parallel else 1)
        activations = layers * in_flight * layer_input + per_layer
    else:
        activations = layers * in_flight * per_layer
    # The final norm's three tensors, on the last stage beside the logits.
    activations += tokens * act_bytes * 3 * config.hidden_size / (layout.tensor if layout.sequence_parallel else 1)
    # fp32 softmax, plus the bf16 logits it was cast from (the same tensor in fp32 training).
    logits = tokens * (config.vocab_size / layout.tensor) * (4 + (act_bytes if act_bytes != 4 else 0))
    return Memory(weights, grads, states, activations, logits, overhead_gb * GB)


def plan(config, layout: Layout, global_batch: int, seq_length: int, train_iters: int,
         patterns: Sequence[str] = ("dilated:64", "dense"), mfu: float = 0.4,
         peak_tflops: float = 989.0) -> Dict[str, float]:
    """Iterations, FLOPs and time at ``mfu`` of ``peak_tflops`` per GPU (H100 bf16 dense: 989).

    ``patterns``: one training step per pattern per iteration (joint training: sparse, dense).
    """
    tokens_per_iter = global_batch * seq_length
    flops = iteration_flops(config, list(patterns), tokens_per_iter, seq_length)
    seconds = flops / (layout.gpus * mfu * peak_tflops * 1e12)
    return {
        "iterations": train_iters,
        "tokens": train_iters * tokens_per_iter,
        "flops_per_iteration": flops,
        "seconds_per_iteration": seconds,
        "tokens_per_day": tokens_per_iter / seconds * 86400,
        "days": train_iters * seconds / 86400,
        "gpu_hours": train_iters * seconds * layout.gpus / 3600,
    }


def iterations_for_tokens(tokens: int, global_batch: int, seq_length: int) -> int:
    """Iterations for ``tokens`` as ratplus-pretrain's --train-tokens counts them (whole iterations)."""
    return max(1, tokens // (global_batch * seq_length))


def report(config, layout: Layout, micro_batch: int, global_batch: int, train_iters: int,
           gpu_memory_gb: float = 80.0, seq_length: Optional[int] = None,
           patterns: Sequence[str] = ("dilated:64", "dense"), bf16: bool = True, recompute: bool = False,
           mfu: float = 0.4, peak_tflops: float = 989.0, overhead_gb: float = 4.0) -> Tuple[str, bool, str]:
    """A dry-run report: (text, fits, reason). ``fits`` is False when the layout is inconsistent
    with the batch sizes or the estimated peak memory exceeds ``gpu_memory_gb``; ``reason``
    then says why in one line (empty when it fits)."""
    seq = seq_length or config.seq_length
    per_step = micro_batch * layout.data
    if global_batch % per_step:
        return "", False, (f"global batch {global_batch} is not divisible by micro-batch {micro_batch} "
                           f"x data-parallel size {layout.data}")
    num_micro = global_batch // per_step
    counts = parameters(config)
    mem = memory_per_gpu(config, layout, micro_batch, seq, num_micro, bf16, recompute, overhead_gb)
    run = plan(config, layout, global_batch, seq, train_iters, patterns, mfu, peak_tflops)
    flops_token = run["flops_per_iteration"] / (global_batch * seq)
    lines = [
        f"model: {config.num_layers} layers x d {config.hidden_size}, {config.num_attention_heads} heads, "
        f"ffn {config.ffn_hidden_size}, vocab {config.vocab_size}, seq {seq}, "
        f"{'recurrence' if config.recurrence else 'baseline (no recurrence)'}",
        f"parameters: {counts['total'] / 1e9:.3f}B (per layer {counts['per_layer'] / 1e6:.2f}M, "
        f"embedding + final norm {counts['fixed'] / 1e6:.2f}M); per GPU {parameters_per_gpu(config, layout) / 1e9:.3f}B",
        f"layout: {layout}; micro-batch {micro_batch}, global batch {global_batch} "
        f"({num_micro} micro-batches per step per DP rank)",
        f"training FLOPs per token: {flops_token / 1e9:.2f} GFLOP over steps {', '.join(map(str, patterns))}",
        f"memory per GPU (GB): weights {mem.weights / GB:.1f}, gradients {mem.gradients / GB:.1f}, "
        f"optimizer {mem.optimizer / GB:.1f}, activations {mem.activations / GB:.1f}"
        f"{' (full recompute)' if recompute else ''}, logits {mem.logits / GB:.1f}, overhead {mem.overhead / GB:.1f}"
        f" = {mem.total / GB:.1f} of {gpu_memory_gb:g}",
        f"run: {train_iters} iterations = {run['tokens'] / 1e9:.2f}B tokens; at MFU {mfu:g} of {peak_tflops:g} TFLOP/s: "
        f"{run['seconds_per_iteration']:.2f} s/iteration, {run['tokens_per_day'] / 1e9:.2f}B tokens/day, "
        f"{run['days']:.2f} days, {run['gpu_hours']:,.0f} GPU-hours",
    ]
    fits = mem.total <= gpu_memory_gb * GB
    reason = "" if fits else (f"estimated {mem.total / GB:.1f} GB per GPU exceeds {gpu_memory_gb:g} GB "
                              f"(activations {mem.activations / GB:.1f} GB at micro-batch {micro_batch}): "
                              "lower --micro-batch-size or raise tensor/pipeline/context parallelism")
    return "\n".join(lines), fits, reason


def available_bytes(device=None) -> int:
    """Memory a new allocation can use: CUDA's free bytes on a GPU, else the host's MemAvailable."""
    import torch

    if device is not None and torch.device(device).type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_fits(what: str, needed: float, device=None) -> None:
    """Refuse (UserError, with the numbers) what would not fit the memory of ``device`` before
    allocating it: a typo'd size must end in one line, not in minutes of swapping or an OOM kill."""
    free = available_bytes(device)
    if needed > free:
        raise UserError(f"{what} needs {needed / GB:.1f} GB, but {free / GB:.1f} GB of "
                        f"{'GPU' if device is not None and str(device).startswith('cuda') else 'host'} "
                        "memory is available")


def check_weights_fit(config, layout: Layout = Layout(), device=None) -> None:
    """The model's weights on one rank of ``layout``, in ``config.params_dtype``, must fit."""
    import torch

    itemsize = torch.empty((), dtype=getattr(config, "params_dtype", torch.float32)).element_size()
    per_rank = parameters_per_gpu(config, layout)
    check_fits(f"a model of {config.num_layers} layers x hidden size {config.hidden_size} "
               f"({per_rank / 1e9:.2f}B parameters per rank)", per_rank * itemsize, device)


__all__ = ["Layout", "Memory", "parameters", "parameters_per_gpu", "activation_elements_per_token",
           "memory_per_gpu", "plan", "iterations_for_tokens", "report", "available_bytes", "check_fits",
           "check_weights_fit"]
