"""One global batch through megatron-core's pipeline schedules, for any parallel layout.

get_forward_backward_func picks the schedule from parallel_state: no pipelining, 1F1B, or the
interleaved (virtual pipeline) one. This module supplies what the schedules leave to the caller:
the model chunks per virtual stage, the forward step (context-parallel batch slicing, the
GPTModel call) and the loss function, which follows megatron's convention: the local token sum
over the CP group's token count, so that the schedule's x CP scaling and the gradient average over data x context parallel ranks
give the gradient of the global token mean.
"""

from __future__ import annotations

from functools import partial
from typing import Dict, Iterable, List, Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_batch_on_this_cp_rank

from megatron_ratplus.model import build_model

__all__ = ["build_model_chunks", "configure_schedules", "forward_backward", "slice_batch_for_cp"]


def build_model_chunks(config, transformer_impl: Optional[str] = None) -> List[torch.nn.Module]:
    """This rank's model chunks, one per virtual pipeline stage (one without interleaving), each
    with the embedding / output layer only where its stage is the first / last;
    ``transformer_impl`` as model.build_model takes it (None: TE where usable, else local)."""
    vpp = config.virtual_pipeline_model_parallel_size
    stages = [None] if not vpp else range(vpp)
    return [build_model(config, transformer_impl,
                        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
                        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp),
                        vp_stage=vp) for vp in stages]


def configure_schedules(config, wrapped: Sequence[torch.nn.Module]) -> None:
    """Set what megatron's schedules read from the config: the gradient finalisation (DP/CP
    average, SP norm and tied-embedding all-reduces) and the no-sync context of each chunk.

    On CPU (gloo) pipeline p2p runs unbatched: gloo matches batched isend/irecv between the same
    two ranks by posting order only, so with two stages (previous rank = next rank) a batch
    could pair an activation with a gradient of the same shape; megatron's unbatched path posts
    them in a matched even/odd-rank order.
    """
    config.finalize_model_grads_func = finalize_model_grads
    no_sync = [chunk.no_sync for chunk in wrapped]
    config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    if not torch.cuda.is_available():
        config.batch_p2p_comm = False


def slice_batch_for_cp(batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """This CP rank's two slices of every [b, s, ...] tensor in ``batch`` (megatron's own slicer).

    ``position_ids`` are sliced too, so they keep the global positions. A no-op without CP.
    """
    return get_batch_on_this_cp_rank(dict(batch))


def _loss(loss_mask: torch.Tensor, output: torch.Tensor):
    local_sum = (output.float() * loss_mask).sum()
    stats = torch.stack([local_sum.detach(), loss_mask.sum()])  # [sum, tokens] over the CP group
    dist.all_reduce(stats, group=parallel_state.get_context_parallel_group())
    reported = stats[0] / stats[1]
    return local_sum / stats[1].clamp(min=1), {"lm loss": reported}


def forward_step(data_iterator, model):
    batch = slice_batch_for_cp(next(data_iterator))
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(_loss, batch["loss_mask"])


def forward_backward(model: Sequence[torch.nn.Module], microbatches: List[Dict], seq_length: int,
                     micro_batch_size: int, forward_only: bool = False) -> float:
    """Run ``microbatches`` (this data-parallel rank's, full length, as
    megatron_ratplus.data.collate makes them) through the schedule, ``model`` being data_parallel.wrap_model's chunks; gradients end
    reduced (see :func:`configure_schedules`). Returns the mean loss over data-parallel ranks (0.0 off the last stage)."""
    model = list(model)
    configure_schedules(model[0].config, model)
    iterators: Iterable = [iter(microbatches) for _ in model] if len(model) > 1 else iter(microbatches)
    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iterators, model=model if len(model) > 1 else model[0],
        num_microbatches=len(microbatches), seq_length=seq_length, micro_batch_size=micro_batch_size,
        forward_only=forward_only)
    if not losses:
        return 0.0
    mean = torch.stack([item["lm loss"] for item in losses]).mean()
    dist.all_reduce(mean, group=parallel_state.get_data_parallel_group())
    return (mean / parallel_state.get_data_parallel_world_size()).item()
