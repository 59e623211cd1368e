"""One optimizer step and one validation pass, on megatron-core's forward/backward schedules.

The schedule (``get_forward_backward_func``) runs the micro-batches through the model chunks,
pipelined when PP > 1; these functions add what RAT+ needs around it: the attention pattern of
the step, loss bookkeeping across data-parallel ranks, and non-finite-loss detection.
"""

from __future__ import annotations

from typing import Dict, List

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_ratplus.layers.mixer import set_attention_pattern


def forward_step(data_iterator, model):
    """megatron forward_step_func: per-token LM loss, summed, with the token count."""
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    mask = batch["loss_mask"].float()

    def loss_func(per_token_loss):
        loss_sum = (per_token_loss.float() * mask).sum()
        tokens = mask.sum()
        return loss_sum, tokens.to(torch.int), {"lm loss": torch.stack([loss_sum.detach(), tokens])}

    return output, loss_func


def _mean_loss(loss_dicts: List[Dict[str, torch.Tensor]]) -> float:
    """Token-weighted mean over micro-batches and data-parallel ranks, the same on every rank."""
    totals = torch.zeros(2)
    for item in loss_dicts:
        totals += item["lm loss"].float()
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        dist.all_reduce(totals, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    else:
        totals.zero_()
    # every stage learns the loss (non-finite checks must agree on all ranks)
    dist.all_reduce(totals, group=parallel_state.get_pipeline_model_parallel_group())
    return float(totals[0] / totals[1].clamp(min=1))


def run_schedule(model_chunks, microbatches: List[dict], seq_length: int, forward_only: bool) -> float:
    iterators = [iter(microbatches) for _ in model_chunks] if len(model_chunks) > 1 else iter(microbatches)
    loss_dicts = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iterators,
        model=model_chunks if len(model_chunks) > 1 else model_chunks[0],
        num_microbatches=len(microbatches), seq_length=seq_length,
        micro_batch_size=microbatches[0]["tokens"].shape[0], forward_only=forward_only)
    return _mean_loss(loss_dicts)


def train_step(model_chunks, optimizer, microbatches: List[dict], seq_length: int, pattern) -> dict:
    """Forward, backward, clip and update at ``pattern``; a non-finite loss or norm skips the update."""
    for chunk in model_chunks:
        set_attention_pattern(chunk, pattern)
        chunk.train()
    optimizer.zero_grad()
    loss = run_schedule(model_chunks, microbatches, seq_length, forward_only=False)
    if not torch.isfinite(torch.tensor(loss)):
        optimizer.zero_grad()
        return {"loss": loss, "grad_norm": float("nan"), "updated": False}
    updated, grad_norm = optimizer.step()
    return {"loss": loss, "grad_norm": grad_norm, "updated": updated}


@torch.no_grad()
def evaluate(model_chunks, microbatches: List[dict], seq_length: int, pattern) -> float:
    """Mean validation token loss at ``pattern`` (the model is left in eval mode)."""
    for chunk in model_chunks:
        set_attention_pattern(chunk, pattern)
        chunk.eval()
    return run_schedule(model_chunks, microbatches, seq_length, forward_only=True)
