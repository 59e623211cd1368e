"""The batch side of megatron's load-balanced context-parallel layout (the chunk maths the mixer
needs is in ``megatron_ratplus.layers.context_parallel.layout``)."""

from __future__ import annotations

from typing import Dict

import torch
from megatron.core.utils import get_batch_on_this_cp_rank


def slice_batch_for_cp(batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """This CP rank's two slices of every [b, s, ...] tensor in ``batch`` (megatron's own slicer).

    ``position_ids`` are sliced too, so they keep the global positions. A no-op without CP.
    """
    return get_batch_on_this_cp_rank(dict(batch))
