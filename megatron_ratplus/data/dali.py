"""``--dataloader-type dali``: token batches prefetched to the GPU by an NVIDIA DALI pipeline.

The plain loader builds each micro-batch on the CPU when the step needs it and copies it to the
device in the step. Here a DALI pipeline pulls micro-batches from an external source (the same
:class:`MicrobatchFeed` order as the plain loader: megatron's indexed dataset through the
training BatchSource) and copies them to the GPU on DALI's own threads and stream, a few
micro-batches ahead (``prefetch``), so the copy overlaps the previous step's compute.

Needs the ``nvidia-dali`` package and a CUDA device; :func:`require_dali` says so in one line
(a UserError, exit status 2 in the CLIs) before anything starts. Not yet run on a GPU.
"""

from __future__ import annotations

from typing import Dict, Iterator, List, Optional

import numpy as np
import torch

from megatron_ratplus.optional import require

KEYS = ("tokens", "labels", "loss_mask", "position_ids")  # data.datasets.collate's keys, in this order


def require_dali():
    """The ``nvidia.dali`` module, or a one-line MissingDependency (no package, or no CUDA device)."""
    return require("nvidia.dali", "--dataloader-type dali", cuda=True)


class MicrobatchFeed:
    """DALI's external source: micro-batch ``k`` of the run as numpy arrays, in ``KEYS`` order.

    Micro-batch k is micro-batch ``k % M`` of iteration ``k // M`` (M per iteration), taken from
    ``batch_source.microbatches`` exactly as the plain loader takes it, so both loaders feed the
    same samples in the same order and a resumed run (``consumed``) continues where it stopped.
    """

    def __init__(self, batch_source, consumed: int, global_batch_size: int, iterations: int):
        self.source, self.consumed, self.global_batch = batch_source, consumed, global_batch_size
        self.iterations = iterations
        self.per_iteration = global_batch_size // (batch_source.micro * batch_source.dp_size)
        self._iteration, self._micro = None, None

    def __call__(self, info) -> tuple:
        index = getattr(info, "iteration", info)  # DALI passes a BatchInfo (batch_info=True)
        iteration, micro = divmod(index, self.per_iteration)
        if iteration >= self.iterations:
            raise StopIteration
        if iteration != self._iteration:  # one global batch is assembled once, then handed out
            self._iteration = iteration
            self._micro = self.source.microbatches(self.consumed + iteration * self.global_batch,
                                                   self.global_batch)
        batch = self._micro[micro]
        return tuple(np.ascontiguousarray(batch[key].numpy()) for key in KEYS)


def dali_batches(batch_source, consumed: int, global_batch_size: int, iterations: int,
                 device_id: Optional[int] = None, prefetch: int = 2,
                 num_threads: int = 2) -> Iterator[List[Dict[str, torch.Tensor]]]:
    """Per iteration, this rank's micro-batches as ``batch_source.microbatches`` returns them
    (dicts of ``KEYS``), already on the GPU; ``iterations`` global batches from ``consumed``."""
    require_dali()
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import DALIGenericIterator

    feed = MicrobatchFeed(batch_source, consumed, global_batch_size, iterations)

    @pipeline_def
    def token_pipeline():
        outputs = fn.external_source(source=feed, num_outputs=len(KEYS), batch=True, batch_info=True,
                                     dtype=[types.INT64, types.INT64, types.FLOAT, types.INT64])
        return tuple(output.gpu() for output in outputs)

    pipe = token_pipeline(batch_size=batch_source.micro, num_threads=num_threads,
                          device_id=torch.cuda.current_device() if device_id is None else device_id,
                          prefetch_queue_depth=prefetch, exec_async=True, exec_pipelined=True)
    pipe.build()
    return _per_iteration(DALIGenericIterator([pipe], list(KEYS), size=-1), feed.per_iteration)


def _per_iteration(iterator, per_iteration: int) -> Iterator[List[Dict[str, torch.Tensor]]]:
    group: List[Dict[str, torch.Tensor]] = []
    for outputs in iterator:
        # clone: the iterator may hand out the same device buffers again for later batches
        group.append({key: outputs[0][key].clone() for key in KEYS})
        if len(group) == per_iteration:
            yield group
            group = []
