"""Reference top-k block attention (DESIGN §1 "Top-k block").

Candidate keys are all positions, or with ``d=D`` only the dilated states j = mD - 1. They are
cut into blocks of B candidates; each block is summarised by the mean (or max) of its keys. A
query t scores the blocks that lie wholly before its own block, keeps the K best, and attends
their candidates, the visible candidates of its own block, its window and the sinks.

The selection is a discrete choice (no gradient flows through it); the attention over the
selected keys is differentiable. This reference materialises a [b, h, T, T] mask: it is the
readable ground truth for tests and the Triton kernel, not a fast path.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from megatron_ratplus.patterns import AttentionPattern


def _pool_blocks(keys: torch.Tensor, block: int, pool: str) -> torch.Tensor:
    """[b, h, M, d] candidate keys -> [b, h, ceil(M / block), d] pooled block keys."""
    b, h, m, d = keys.shape
    n_blocks = -(-m // block)
    pad = n_blocks * block - m
    if pool == "mean":
        padded = F.pad(keys, (0, 0, 0, pad))
        counts = torch.full((n_blocks,), float(block), device=keys.device)
        counts[-1] = block - pad
        return padded.view(b, h, n_blocks, block, d).sum(3) / counts.view(1, 1, -1, 1).to(keys.dtype)
    padded = F.pad(keys, (0, 0, 0, pad), value=float("-inf"))
    return padded.view(b, h, n_blocks, block, d).amax(3)


def topk_allowed_mask(q: torch.Tensor, k: torch.Tensor, pattern: AttentionPattern,
                      softmax_scale: Optional[float] = None,
                      query_pos: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Boolean [b, h, Tq, Tk] mask of the keys each query attends under a top-k pattern.

    q: [b, h, Tq, d] at positions ``query_pos`` ([b, Tq]; default 0..Tq-1); k: [b, h, Tk, d] at
    positions 0..Tk-1. Decoding passes one query per sequence and the whole key cache; keys
    after a query's position never count (they may be unwritten cache slots).
    """
    b, h, n_q = q.shape[:3]
    n_k = k.shape[2]
    dilation = pattern.dilation or 1
    if query_pos is None:
        query_pos = torch.arange(n_q, device=q.device).expand(b, n_q)
    t = query_pos.view(b, 1, n_q, 1)
    pos = torch.arange(n_k, device=q.device)
    is_state = (pos + 1) % dilation == 0
    state_index = torch.where(is_state, (pos + 1) // dilation - 1, torch.full_like(pos, -1))
    key_block = torch.where(is_state, state_index // pattern.block, torch.full_like(pos, -1))

    candidates = k[:, :, dilation - 1::dilation]
    pooled = _pool_blocks(candidates, pattern.block, pattern.pool) if candidates.shape[2] else None
    n_visible = (t + 1) // dilation  # candidates visible to each query
    own_block = torch.div(n_visible - 1, pattern.block, rounding_mode="floor")  # -1: none yet

    if pooled is None:
        selected = torch.zeros(b, h, n_q, 1, dtype=torch.bool, device=q.device)
    else:
        scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
        scores = torch.einsum("bhtd,bhnd->bhtn", q.float(), pooled.float()) * scale
        n_blocks = scores.shape[-1]
        block_ids = torch.arange(n_blocks, device=q.device)
        earlier = block_ids < own_block  # [b, 1, Tq, n_blocks]
        scores = scores.masked_fill(~earlier, float("-inf"))
        selected = torch.zeros_like(scores, dtype=torch.bool)
        kk = min(pattern.topk, n_blocks)
        if kk:
            best = scores.topk(kk, dim=-1).indices
            selected.scatter_(-1, best, True)
            selected &= earlier  # fewer than K earlier blocks: drop the -inf picks
        selected |= block_ids == own_block
    gather_index = key_block.clamp(min=0).view(1, 1, 1, n_k).expand(b, h, n_q, n_k)
    by_block = selected.gather(-1, gather_index) & (key_block >= 0)
    j = pos.view(1, 1, 1, n_k)
    rule = (t - j <= pattern.window) | (j < pattern.sinks)
    return (by_block | rule) & (j <= t)


def topk_block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: AttentionPattern,
                         softmax_scale: Optional[float] = None) -> torch.Tensor:
    """q, k, v: [b, h, T, d] -> [b, h, T, d] under a top-k block pattern."""
    with torch.no_grad():
        mask = topk_allowed_mask(q, k, pattern, softmax_scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=softmax_scale)
