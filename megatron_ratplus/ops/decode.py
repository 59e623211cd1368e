"""Reference decode attention: one new query per sequence against its decode cache's slots.

A decode cache (docs/DESIGN.md §5) holds keys/values in slots, each tagged with the position it
holds (-1: empty, or a position another slot already holds, which must count once). The query
at position t attends slot s iff its position j >= 0 and the pattern's rule admits (t, j)
(docs/DESIGN.md §2), so one contract serves the compact ``[sinks | ring | chunk ends]`` layout
and the full layout (position = slot index). This is the plain ground truth for the Triton
decode kernel.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_ratplus.patterns import AttentionPattern, visible


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_positions: torch.Tensor,
                     query_positions: torch.Tensor, pattern: AttentionPattern,
                     softmax_scale: Optional[float] = None) -> torch.Tensor:
    """q [b, h, d], k_cache/v_cache [b, h, S, d], slot_positions [b, S], query_positions [b] -> [b, h, d].

    Output in q's dtype; a query that sees no slot gets zeros.
    """
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape[:2] != q.shape[:2] or k_cache.shape[3] != q.shape[2]:
        raise ValueError(f"decode_attention: expected q [b, h, d] and caches [b, h, S, d], got "
                         f"{tuple(q.shape)} and {tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"decode_attention: v_cache {tuple(v_cache.shape)} must match k_cache {tuple(k_cache.shape)}")
    batch, _, slots, _ = k_cache.shape
    if slot_positions.shape != (batch, slots) or query_positions.shape != (batch,):
        raise ValueError(f"decode_attention: expected slot_positions [b, S] = [{batch}, {slots}] and "
                         f"query_positions [b] = [{batch}], got {tuple(slot_positions.shape)} and "
                         f"{tuple(query_positions.shape)}")
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    seen = (slot_positions >= 0) & visible(pattern, query_positions.unsqueeze(1), slot_positions)  # [b, S]
    scores = torch.einsum("bhd,bhsd->bhs", q.float(), k_cache.float()) * scale
    scores = scores.masked_fill(~seen.unsqueeze(1), float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # no slot seen: all -inf -> NaN -> 0
    return torch.einsum("bhs,bhsd->bhd", probs, v_cache.float()).to(q.dtype)
