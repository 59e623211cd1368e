"""Reference decode attention: one new query per sequence against its compact sparse KV cache.

A sparse pattern's decode cache holds only the slots the next query may see (sinks, every D-th
state, the window, the newest state; docs/DESIGN.md §5), packed to the front of a fixed-capacity buffer.
Each sequence of the batch has its own number of filled slots; the rest are ignored. This is the
plain ground truth for the Triton decode kernel.
"""

from __future__ import annotations

from typing import Optional

import torch


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
                     softmax_scale: Optional[float] = None) -> torch.Tensor:
    """q [b, h, d], k_cache/v_cache [b, h, S, d], lengths [b] -> [b, h, d] (q's dtype).

    Slot s of sequence i is attended iff s < lengths[i]; a sequence with length 0 gets zeros.
    """
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape[:2] != q.shape[:2] or k_cache.shape[3] != q.shape[2]:
        raise ValueError(f"decode_attention: expected q [b, h, d] and caches [b, h, S, d], got "
                         f"{tuple(q.shape)} and {tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"decode_attention: v_cache {tuple(v_cache.shape)} must match k_cache {tuple(k_cache.shape)}")
    if lengths.shape != (q.shape[0],):
        raise ValueError(f"decode_attention: lengths must be [b] = [{q.shape[0]}], got {tuple(lengths.shape)}")
    if int(lengths.min()) < 0 or int(lengths.max()) > k_cache.shape[2]:
        raise ValueError(f"decode_attention: lengths must lie in [0, {k_cache.shape[2]}] (the cache capacity)")
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    scores = torch.einsum("bhd,bhsd->bhs", q.float(), k_cache.float()) * scale
    filled = torch.arange(k_cache.shape[2], device=q.device) < lengths.unsqueeze(1)  # [b, S]
    scores = scores.masked_fill(~filled.unsqueeze(1), float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # length 0: all -inf -> NaN -> 0
    return torch.einsum("bhs,bhsd->bhd", probs, v_cache.float()).to(q.dtype)
