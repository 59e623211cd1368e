"""One optimizer step and one validation pass at an attention pattern.

megatron_ratplus.training.schedule runs the micro-batches through megatron-core's schedules
(pipelined when PP > 1, context-parallel slicing, gradients reduced); this module adds what
RAT+ training needs around it: the step's pattern and non-finite-loss detection that every
rank agrees on.
"""

from __future__ import annotations

from typing import List

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_ratplus.model import evaluating, set_attention_pattern
from megatron_ratplus.training import schedule


def _run(model_chunks, microbatches: List[dict], seq_length: int, forward_only: bool) -> float:
    """The schedule's mean loss, made known to every pipeline stage (it lives on the last one)."""
    loss = schedule.forward_backward(model_chunks, microbatches, seq_length,
                                     microbatches[0]["tokens"].shape[0], forward_only=forward_only)
    shared = torch.tensor([loss if parallel_state.is_pipeline_last_stage(ignore_virtual=True) else 0.0])
    dist.all_reduce(shared, group=parallel_state.get_pipeline_model_parallel_group())
    return float(shared)


def train_step(model_chunks, optimizer, microbatches: List[dict], seq_length: int, pattern) -> dict:
    """Forward, backward, clip and update at ``pattern``; a non-finite loss or norm skips the update."""
    for chunk in model_chunks:
        set_attention_pattern(chunk, pattern)
        chunk.train()
    optimizer.zero_grad()
    loss = _run(model_chunks, microbatches, seq_length, forward_only=False)
    if not torch.isfinite(torch.tensor(loss)):
        optimizer.zero_grad()
        return {"loss": loss, "grad_norm": float("nan"), "updated": False}
    updated, grad_norm = optimizer.step()
    return {"loss": loss, "grad_norm": grad_norm, "updated": updated}


@torch.no_grad()
def evaluate(model_chunks, microbatches: List[dict], seq_length: int, pattern) -> float:
    """Mean validation token loss at ``pattern``."""
    with evaluating(model_chunks, pattern):
        return _run(model_chunks, microbatches, seq_length, forward_only=True)
